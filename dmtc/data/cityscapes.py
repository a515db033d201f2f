"""Cityscapes label ids → the 19 train ids, from the official label table.

Cityscapes ships ``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png`` with the 34 label ids of
``cityscapesscripts.helpers.labels`` (0 = unlabeled ... 33 = bicycle). Semantic segmentation, and DMT's
protocol (DMT §4.1), train and evaluate on the 19 classes that table gives a ``trainId`` 0..18; every
other id (void classes, ``trainId`` 255 or -1) becomes 255 = ignore. The table's ``id == -1`` entry
(license plate) is never written into label images and is skipped. Class names and the colour palette
come from the same table, so they always match the official evaluation.
"""

from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import labels as _LABELS

from dmtc.data.layouts import IGNORE_INDEX

NUM_CLASSES = 19


def _train_labels() -> list:
    by_train_id = {label.trainId: label for label in _LABELS if 0 <= label.trainId < IGNORE_INDEX}
    if sorted(by_train_id) != list(range(NUM_CLASSES)):
        raise RuntimeError(f"cityscapesscripts' label table has train ids {sorted(by_train_id)}, expected 0..18")
    return [by_train_id[i] for i in range(NUM_CLASSES)]


def cityscapes_label_map() -> dict[int, int]:
    """``{label id: train id}`` for every label id of the table (void ids → 255; id -1 skipped)."""
    return {
        label.id: label.trainId if 0 <= label.trainId < IGNORE_INDEX else IGNORE_INDEX
        for label in _LABELS
        if label.id >= 0
    }


def cityscapes_lut() -> np.ndarray:
    """256-entry uint8 lookup table: ``lut[label_id] = train id``; ids outside the table → 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in cityscapes_label_map().items():
        lut[label_id] = train_id
    return lut


def cityscapes_class_names() -> list[str]:
    """The 19 class names in train-id order (road, sidewalk, ..., bicycle)."""
    return [label.name for label in _train_labels()]


def cityscapes_palette() -> list[tuple[int, int, int]]:
    """RGB colour of each of the 19 classes in train-id order (the official colours)."""
    return [tuple(label.color) for label in _train_labels()]
