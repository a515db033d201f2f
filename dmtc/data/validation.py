"""Checks of a dataset on disk that run before any training starts.

Every problem a user can have with downloaded data ends in one :class:`~dmtc.errors.DMTCError` that names
the file or folder and the fix, within seconds: the root or a subfolder is missing, a split list names
images that do not exist, an image has no label, or a label holds values outside the class set (other
than 255 and the dataset's void ids). Existence is checked for every listed name (one ``stat`` each);
label values are checked on a small, evenly spaced sample of decoded labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dmtc.data.datasets import read_label
from dmtc.data.layouts import DatasetLayout
from dmtc.errors import DMTCError

IGNORE_INDEX = 255


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
                               "restore the label files (or train with the images unlabeled)")


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
    """All checks before training: folders, every listed file, and a sample of label values per subset."""
    check_folders(layout, [s.subset for s in name_sets], labels=any(s.labels for s in name_sets))
    check_names(layout, name_sets)
    for entry in name_sets:
        if entry.labels:
            check_label_values(layout, entry.subset, entry.names, allowed, sample=sample)
