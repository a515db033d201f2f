"""Labeled/unlabeled splits of a training set, following the DMT protocol.

DMT (Feng et al., Pattern Recognition 2022, §4.1 and its public split lists) builds every split from one
base list, the lexicographically sorted training names. ``random.seed(7777)`` is set once, then the list is
shuffled three times *cumulatively*: the order after the ``i``-th shuffle defines split id ``i``. For a
split ratio ``s`` the labeled set is the first ``int(N / s)`` names, plus one more name when that count is
``1 (mod 8)`` (so that a batch of 8 never ends with a single image); the rest, in shuffled order, is the
unlabeled set. Split names ``30`` and ``106`` stand for the ratios 29.75 and 105.82.

Two more kinds of split come from DMT's released lists (§4.1, §4.3):

* **difference-maximized sampling** (``split=106-l`` / ``106-r``, also for 8, 20, 50): the two models of
  a pair are warmed up on two different 80% subsets of the labeled set that share 60% of it
  (:func:`dms_subset`);
* **SBD** (``split=sbd``): the labeled set is VOC's ``train.txt`` (1464 images), the unlabeled set the
  ``trainaug.txt`` ids that are not in it (:func:`sbd_split`).

List files hold one name per line; only the first whitespace-separated token counts, so lists with extra
columns (an image path and a label path) are read too, and :func:`strip_template` turns paths into names.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from dmtc.errors import DMTCError
from dmtc.files import atomic_write_text

DMT_SEED = 7777
NUM_SPLIT_IDS = 3
#: Split names whose ratio is not the name itself (Cityscapes 1/30 = 100 of 2975, VOC 1/106 = 100 of 10582).
SPLIT_RATIOS: dict[str, float] = {"30": 29.75, "106": 105.82}
#: Difference-maximized sampling: the splits it is made for, in the order DMT's script shuffles them.
DMS_SPLITS: tuple[str, ...] = ("8", "20", "50", "106")
DMS_SIDES: tuple[str, ...] = ("l", "r")
#: Fraction of a labeled list that each DMS subset leaves out (the two subsets share 1 - 2 * 0.2 of it).
DMS_HOLDOUT = 0.2
SBD_SPLIT = "sbd"


def parse_split(split: str | int | float) -> tuple[str, str | None]:
    """``(base, side)`` of a split name: ``"8"`` → ``("8", None)``, ``"106-l"`` → ``("106", "l")``.

    ``sbd`` is returned as ``("sbd", None)``; any other name must be a ratio (:func:`split_ratio`).
    """
    name = str(split).strip()
    if name.lower() == SBD_SPLIT:
        return SBD_SPLIT, None
    base, sep, side = name.rpartition("-")
    if sep and side in DMS_SIDES:
        if base not in DMS_SPLITS:
            raise DMTCError(
                f"split={name!r}: difference-maximized subsets (-l/-r) exist for splits {list(DMS_SPLITS)} only"
            )
        return base, side
    split_ratio(name)
    return name, None


def split_ratio(split: str | int | float) -> float:
    """Return the ratio ``s`` (1/s of the training set is labeled) for a split name such as ``8`` or ``30``."""
    name = str(split)
    if name in SPLIT_RATIOS:
        return SPLIT_RATIOS[name]
    try:
        ratio = float(name)
    except ValueError as err:
        raise DMTCError(
            f"split={name!r} is not a split name: use a ratio such as split=8 (1/8 labeled) or split=1 (all), "
            "a difference-maximized subset such as split=106-l, or split=sbd (VOC)"
        ) from err
    if ratio < 1:
        raise DMTCError(f"split={name!r} must be >= 1 (split=8 means 1/8 of the images are labeled)")
    return ratio


def num_labeled(num_images: int, ratio: float) -> int:
    """Labeled count of DMT's protocol: ``int(N / ratio)``, plus one if that is ``1 (mod 8)``."""
    count = int(num_images / ratio)
    if count % 8 == 1:
        count += 1
    return min(count, num_images)


def dmt_split(names: Sequence[str], ratio: float, sid: int) -> tuple[list[str], list[str]]:
    """Split ``names`` into (labeled, unlabeled) exactly as DMT's split lists were made.

    ``names`` are sorted first; ``sid`` in 0..2 selects the order after the ``sid + 1``-th cumulative
    ``random.shuffle`` under ``random.seed(7777)``. The global ``random`` state is saved and restored.
    """
    if not 0 <= int(sid) < NUM_SPLIT_IDS:
        raise DMTCError(f"sid={sid} is not a split id: DMT's protocol has sid 0, 1 or 2")
    order = sorted(names)
    state = random.getstate()
    try:
        random.seed(DMT_SEED)
        for _ in range(int(sid) + 1):
            random.shuffle(order)
    finally:
        random.setstate(state)
    count = num_labeled(len(order), ratio)
    return order[:count], order[count:]


def dms_subset(labeled_list: Callable[[str, int], Sequence[str]], split: str, sid: int, side: str) -> list[str]:
    """The ``side`` ("l" or "r") difference-maximized subset of split ``split``/``sid`` (DMT §4.3).

    DMT's script seeds ``random.seed(7777)`` once, then for sid 0..2 and split 8, 20, 50, 106 (in that
    order) shuffles that split's labeled list (in its file order) and keeps, with ``nc = ceil(0.2 n)``, the
    first ``n - nc`` names as ``-l`` and the last ``n - nc`` as ``-r``. ``labeled_list(split, sid)`` returns
    the labeled list of a split; every list before the requested one is shuffled too, so that the random
    stream matches. The global ``random`` state is saved and restored.
    """
    split, sid = str(split), int(sid)
    if split not in DMS_SPLITS or side not in DMS_SIDES or not 0 <= sid < NUM_SPLIT_IDS:
        raise DMTCError(f"no difference-maximized subset {split}-{side} for sid={sid}")
    state = random.getstate()
    try:
        random.seed(DMT_SEED)
        for current_sid in range(NUM_SPLIT_IDS):
            for current in DMS_SPLITS:
                names = list(labeled_list(current, current_sid))
                random.shuffle(names)
                if (current, current_sid) == (split, sid):
                    keep = len(names) - math.ceil(DMS_HOLDOUT * len(names))
                    return names[:keep] if side == "l" else names[len(names) - keep :]
    finally:
        random.setstate(state)
    raise AssertionError("unreachable")


def sbd_split(voc_train: Sequence[str], trainaug: Sequence[str]) -> tuple[list[str], list[str]]:
    """DMT's SBD split: labeled = VOC ``train.txt`` (1464), unlabeled = ``trainaug`` ids not in it (9118)."""
    labeled = list(voc_train)
    known = set(labeled)
    return labeled, [name for name in trainaug if name not in known]


def strip_template(name: str, template: str, subset: str) -> str:
    """A list entry as a layout name: ``/JPEGImages/2007_000032.jpg`` → ``2007_000032`` for template
    ``JPEGImages/{name}.jpg``; entries that are already names are returned unchanged."""
    name = name.strip()
    prefix, _, suffix = template.format(subset=subset, name="\0").partition("\0")
    bare = name.lstrip("/")
    if prefix and bare.startswith(prefix):
        bare = bare[len(prefix) :]
    elif prefix:
        return name
    if suffix and bare.endswith(suffix):
        bare = bare[: -len(suffix)]
    return bare


def read_list(path: Path) -> list[str]:
    """Read a name list: the first whitespace-separated token of each non-blank line."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError as err:
        raise DMTCError(f"split list {path} does not exist") from err
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def write_list(path: Path, names: Sequence[str]) -> None:
    """Write a name list atomically (a temporary sibling of its own, then a rename: processes that write the
    same list at once, e.g. the tasks of a DDP job, each rename a complete file)."""
    atomic_write_text(path, "".join(f"{name}\n" for name in names))
