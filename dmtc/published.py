"""The published numbers a sweep is compared with: val mIoU (%) of DeepLab-v2 ResNet-101.

Source: Feng et al., "DMT: Dynamic Mutual Training for Semi-Supervised Learning", Pattern Recognition 2022
(DMT and its supervised baselines: the Cityscapes and PASCAL VOC 2012 tables), and the published DMTC
results (DMT with a regional contrastive term). Splits use dmtc's names: ``30`` is DMT's 1/30 (29.75),
``106`` its 1/106 (105.82, reported as 1/100 for DMTC).
"""

from __future__ import annotations

SOURCE = "Feng et al., DMT, Pattern Recognition 2022 (DMT and supervised baselines); the published DMTC results"

#: (method, dataset, split) -> published val mIoU (%)
PUBLISHED: dict[tuple[str, str, str], float] = {
    ("dmt", "city", "30"): 54.80,
    ("dmt", "city", "8"): 63.03,
    ("dmt", "voc", "106"): 63.04,
    ("dmt", "voc", "50"): 67.15,
    ("dmt", "voc", "20"): 69.92,
    ("dmt", "voc", "8"): 72.70,
    ("dmtc", "city", "30"): 59.54,
    ("dmtc", "city", "8"): 65.33,
    ("dmtc", "city", "4"): 66.37,
    ("dmtc", "voc", "106"): 65.45,
    ("dmtc", "voc", "50"): 68.10,
    ("dmtc", "voc", "20"): 70.20,
    ("dmtc", "voc", "8"): 72.50,
    ("supervised", "city", "30"): 49.54,
    ("supervised", "city", "8"): 59.65,
    ("supervised", "voc", "106"): 46.66,
    ("supervised", "voc", "50"): 55.62,
    ("supervised", "voc", "20"): 62.29,
    ("supervised", "voc", "8"): 67.37,
}


def published_miou(method: str, dataset: str, split: str, backbone: str) -> float | None:
    """The published mIoU of this setting, or None (another backbone than ResNet-101 is never comparable)."""
    if backbone != "resnet101":
        return None
    return PUBLISHED.get((str(method), str(dataset), str(split)))
