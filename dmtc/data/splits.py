"""Labeled/unlabeled splits of a training set, following the DMT protocol.

DMT (Feng et al., Pattern Recognition 2022, §4.1 and its public split lists) builds every split from one
base list, the lexicographically sorted training names. ``random.seed(7777)`` is set once, then the list is
shuffled three times *cumulatively*: the order after the ``i``-th shuffle defines split id ``i``. For a
split ratio ``s`` the labeled set is the first ``int(N / s)`` names, plus one more name when that count is
``1 (mod 8)`` (so that a batch of 8 never ends with a single image); the rest, in shuffled order, is the
unlabeled set. Split names ``30`` and ``106`` stand for the ratios 29.75 and 105.82.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from dmtc.errors import DMTCError

DMT_SEED = 7777
NUM_SPLIT_IDS = 3
#: Split names whose ratio is not the name itself (Cityscapes 1/30 = 100 of 2975, VOC 1/106 = 100 of 10582).
SPLIT_RATIOS: dict[str, float] = {"30": 29.75, "106": 105.82}


def split_ratio(split: str | int | float) -> float:
    """Return the ratio ``s`` (1/s of the training set is labeled) for a split name such as ``8`` or ``30``."""
    name = str(split)
    if name in SPLIT_RATIOS:
        return SPLIT_RATIOS[name]
    try:
        ratio = float(name)
    except ValueError as err:
        raise DMTCError(
            f"split={name!r} is not a split ratio: use a number such as split=8 (1/8 labeled) or split=1 (all)"
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


def read_list(path: Path) -> list[str]:
    """Read a name list (one name per line; blank lines and surrounding spaces ignored)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError as err:
        raise DMTCError(f"split list {path} does not exist") from err
    return [line.strip() for line in text.splitlines() if line.strip()]


def write_list(path: Path, names: Sequence[str]) -> None:
    """Write a name list atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{name}\n" for name in names))
    tmp.replace(path)
