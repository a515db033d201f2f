"""Segmentation metrics on a confusion matrix (torchmetrics' ``MulticlassJaccardIndex`` state).

IoU_c = TP_c / (TP_c + FP_c + FN_c). mIoU averages IoU over the classes that occur in the prediction or
the ground truth; classes absent from both are excluded (as the official Cityscapes script does, and as
torchmetrics' macro average does). Pixels labeled 255 are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.classification import MulticlassJaccardIndex

from dmtc.data.layouts import IGNORE_INDEX


def make_miou_metric(num_classes: int, ignore_index: int = IGNORE_INDEX) -> MulticlassJaccardIndex:
    """A macro-averaged Jaccard metric whose ``confmat`` state also yields per-class IoU."""
    return MulticlassJaccardIndex(num_classes=num_classes, ignore_index=ignore_index, average="macro")


def per_class_iou(confmat: torch.Tensor) -> torch.Tensor:
    """Per-class IoU from a C×C confusion matrix (rows = target, columns = prediction); NaN if absent."""
    confmat = confmat.double()
    tp = confmat.diagonal()
    union = confmat.sum(0) + confmat.sum(1) - tp
    iou = tp / union
    return torch.where(union > 0, iou, torch.full_like(iou, float("nan")))


def summarize(confmat: torch.Tensor, class_names: Sequence[str]) -> dict[str, object]:
    """``{"miou": 0–100, "per_class_iou": {name: 0–100 or None when absent}}`` from a confusion matrix."""
    iou = per_class_iou(confmat)
    present = ~torch.isnan(iou)
    miou = float(iou[present].mean() * 100) if present.any() else 0.0
    per_class = {
        name: (round(float(v) * 100, 4) if ok else None) for name, v, ok in zip(class_names, iou, present)
    }
    return {"miou": round(miou, 4), "per_class_iou": per_class}
