"""Checks of a dataset on disk that run before any training starts.

Every problem a user can have with downloaded data ends in one :class:`~dmtc.errors.DMTCError` that names
the file or folder and the fix, within seconds: the root or a subfolder is missing, a split list names
images that do not exist, an image has no label, a file is truncated, or a label holds values outside the
class set (other than 255 and the dataset's void ids). Existence and completeness are checked for every
listed file (a ``stat`` and two small reads each); label values on a small, evenly spaced sample of
decoded labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dmtc.data.datasets import read_label
from dmtc.data.layouts import IGNORE_INDEX, DatasetLayout
from dmtc.errors import DMTCError


@dataclass
class NameSet:
    """Names of one subset that must exist, where they came from, and whether they need labels."""

    subset: str
    names: Sequence[str]
    source: str
    labels: bool = True


def _folder(template: str, subset: str) -> str:
    """The fixed folder part of a path template (``leftImg8bit/train`` of ``leftImg8bit/{subset}/{name}...``)."""
    prefix = template.format(subset=subset, name="\0").partition("\0")[0]
    return prefix.rpartition("/")[0] if "/" in prefix else prefix


def check_folders(layout: DatasetLayout, subsets: Iterable[str], *, labels: bool = True) -> None:
    """The root and each subset's image (and label) folder exist; the message says which and how to fix."""
    layout.check_root()
    for subset in dict.fromkeys(subsets):
        templates = [("image", layout.image_template)] + ([("label", layout.label_template)] if labels else [])
        for kind, template in templates:
            folder = layout.root / _folder(template, subset)
            if not folder.is_dir():
                raise DMTCError(
                    f"{layout.name}: the {kind} folder {folder} for '{subset}' does not exist under dataset.root="
                    f"{layout.root}: point dataset.root at the folder that holds it (the dataset's official layout, "
                    f"see README 'Cityscapes and PASCAL VOC')"
                )


def check_names(layout: DatasetLayout, name_sets: Iterable[NameSet]) -> None:
    """Every listed image exists, and so does its label where one is needed."""
    for entry in name_sets:
        images = [layout.image_path(entry.subset, n) for n in entry.names]
        missing = [p for p in images if not p.is_file()]
        if missing:
            _raise_missing(layout, missing, f"listed in {entry.source}", "images",
                           "check that dataset.root points at the complete download (lists and files from the "
                           "same release); if the list is your own, fix it or delete it to have it generated")
        if entry.labels:
            no_label = [layout.label_path(entry.subset, n) for n in entry.names
                        if not layout.label_path(entry.subset, n).is_file()]
            if no_label:
                _raise_missing(layout, no_label, f"of images in {entry.source}", "labels",
                               "restore the label files, or train with these images unlabeled: move them to "
                               "the unlabeled image folder (dataset=folder: images/unlabeled/, "
                               "dataset.unlabeled_subset) or list them in dataset.split_lists.unlabeled "
                               "(README 'Your own data')")


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_JPEG_MAGIC = b"\xff\xd8"


def file_problem(path: Path) -> str | None:
    """Why an image/label file cannot be decoded completely, from a few bytes at each end (no decoding):
    PNG must start with its signature and end with the IEND chunk, JPEG start with SOI and hold an EOI
    marker (0xFFD9) near its end; other formats are opened by PIL's header parser. None if it looks whole.
    A file cut short by an interrupted download or copy fails this (it would stop training mid-epoch)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 1024))
            tail = f.read()
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if size == 0:
        return "is empty"
    if head.startswith(_PNG_MAGIC):
        return None if tail.endswith(_PNG_END) else "is a truncated PNG (no IEND chunk at its end)"
    if head.startswith(_JPEG_MAGIC):
        return None if b"\xff\xd9" in tail[-64:] else "is a truncated JPEG (no end-of-image marker)"
    try:
        from PIL import Image

        with Image.open(path) as image:
            image.size  # noqa: B018  (parses the header)
    except Exception as err:  # any parser error: not an image we can read
        return f"is not a readable image ({err})"
    return None


def check_integrity(layout: DatasetLayout, name_sets: Iterable[NameSet]) -> None:
    """Every listed image (and needed label) is a whole file (:func:`file_problem`): two small reads per
    file, so a dataset of thousands of images is checked in about a second."""
    bad: list[str] = []
    for entry in name_sets:
        for name in entry.names:
            paths = [layout.image_path(entry.subset, name)]
            if entry.labels:
                paths.append(layout.label_path(entry.subset, name))
            for path in paths:
                problem = file_problem(path)
                if problem:
                    bad.append(f"{path} {problem}")
    if bad:
        shown = "\n  ".join(bad[:5])
        more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DMTCError(f"{layout.name}: {len(bad)} damaged file(s):\n  {shown}{more}\nrestore or re-download "
                        "them (or remove them from the lists)")


def _raise_missing(layout: DatasetLayout, paths: Sequence[Path], where: str, what: str, fix: str) -> None:
    shown = "\n  ".join(str(p) for p in paths[:5])
    more = f"\n  ... and {len(paths) - 5} more" if len(paths) > 5 else ""
    raise DMTCError(f"{layout.name}: {len(paths)} {what} {where} do not exist:\n  {shown}{more}\n{fix}")


def check_list_files(layout: DatasetLayout, subsets: Iterable[str]) -> None:
    """The name list of each subset exists (datasets whose image folder also holds other subsets' images,
    like VOC's ``JPEGImages``, must not fall back to scanning it)."""
    if layout.list_template is None:
        return
    for subset in dict.fromkeys(subsets):
        path = layout.root / layout.list_template.format(subset=subset)
        if not path.is_file():
            raise DMTCError(
                f"{layout.name}: the image list {path} does not exist: put the official list there "
                f"(VOC: trainaug.txt comes with SegmentationClassAug; a copy named train_aug.txt works with "
                f"dataset.train_subset=train_aug)"
            )


def allowed_label_values(num_classes: int, label_map: Mapping[int, int] | None) -> set[int]:
    """Raw values a label file may hold: the label map's keys (ids of the label table, void ids included)
    or, without a map, the class ids 0..num_classes-1; 255 (ignore) always."""
    values = set(label_map) if label_map is not None else set(range(num_classes))
    return values | {IGNORE_INDEX}


def check_label_values(
    layout: DatasetLayout,
    subset: str,
    names: Sequence[str],
    allowed: set[int],
    *,
    sample: int = 8,
) -> None:
    """Decode up to ``sample`` evenly spaced labels of ``names``; each must be a single-channel 8-bit image
    of its image's size whose raw values are all in ``allowed``."""
    if not names or sample <= 0:
        return
    count = min(sample, len(names))
    picks = sorted({round(i * (len(names) - 1) / max(count - 1, 1)) for i in range(count)})
    for index in picks:
        path = layout.label_path(subset, names[index])
        try:
            label = read_label(path)  # raw values: the label map is checked through ``allowed``
        except DMTCError as err:
            raise DMTCError(f"{err} (dataset.label_template={layout.label_template!r})") from None
        values = {int(v) for v in np.unique(label)}
        bad = sorted(values - allowed)
        if bad:
            raise DMTCError(
                f"label {path} holds values {bad[:10]} outside the class set of {layout.name} "
                f"(allowed: {_ranges(allowed)}): use the dataset's official label files "
                f"(dataset.label_template={layout.label_template!r}) or map raw values with dataset.label_map"
            )
        image = layout.image_path(subset, names[index])
        header = cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
        if header is None:
            raise DMTCError(f"cannot read image {image}: the file is corrupt; restore or re-download it")
        if header.shape[:2] != label.shape:
            raise DMTCError(
                f"label {path} is {label.shape[1]}×{label.shape[0]} but its image {image} is "
                f"{header.shape[1]}×{header.shape[0]}: image and label must have the same size"
            )


def _ranges(values: Iterable[int]) -> str:
    ordered = sorted(values)
    parts, start = [], None
    for i, v in enumerate(ordered):
        if start is None:
            start = v
        if i + 1 == len(ordered) or ordered[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def validate_dataset(
    layout: DatasetLayout,
    name_sets: Sequence[NameSet],
    allowed: set[int],
    *,
    sample: int = 8,
) -> None:
    """All checks before training: folders, every listed file (present and whole), and a sample of label
    values per subset."""
    check_folders(layout, [s.subset for s in name_sets if s.labels])
    check_folders(layout, [s.subset for s in name_sets if not s.labels], labels=False)
    check_names(layout, name_sets)
    check_integrity(layout, name_sets)
    for entry in name_sets:
        if entry.labels:
            check_label_values(layout, entry.subset, entry.names, allowed, sample=sample)
