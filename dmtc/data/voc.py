"""PASCAL VOC 2012 with the SBD augmentation: class names and palette.

Layout (root = ``VOCdevkit/VOC2012``): ``JPEGImages/<id>.jpg``, ``SegmentationClassAug/<id>.png``
(single-channel class ids 0..20, 255 on object borders and void) and ``ImageSets/Segmentation/`` with
``train.txt`` (1464 ids), ``val.txt`` (1449) and ``trainaug.txt`` (10582 = VOC train + SBD, minus VOC
val). DMT (§4.1) builds its splits from ``trainaug.txt`` and evaluates on ``val.txt``.
"""

from __future__ import annotations

NUM_CLASSES = 21
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_palette(num_classes: int = NUM_CLASSES) -> list[tuple[int, int, int]]:
    """The VOC colour map (bit-interleaved class index, as in the devkit's ``labelcolormap``)."""
    palette = []
    for index in range(num_classes):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append((r, g, b))
    return palette
