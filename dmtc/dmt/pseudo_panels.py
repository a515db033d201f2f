"""W&B panels of a DMT phase's pseudo labels (:mod:`dmtc.dashboards` has the rest): per model a table
``pseudo/<model>/classes`` of what its labels keep at the phase's ratio r_k (the curriculum, DMT §3.3) and
overlays ``pseudo/<model>/examples`` of a few unlabeled images with the kept and the ignored pixels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from lightning.pytorch.loggers import Logger

from dmtc.dashboards import class_labels, overlay, shown_image, spread, table, wandb_loggers
from dmtc.data.datasets import read_label
from dmtc.data.layouts import IGNORE_INDEX, DatasetLayout
from dmtc.dmt.curriculum import apply_thresholds
from dmtc.dmt.store import PseudoLabelStore
from dmtc.files import is_rank_zero


def pseudo_table(summary: Mapping[str, Any]) -> Any:
    """The table ``pseudo/<model>/classes`` of one model's pseudo-label summary
    (:func:`dmtc.dmt.labeling.pseudo_label_summary`): per class the predicted and kept pixels, the kept share
    (%), the confidence threshold p_c of the ratio, and the kept labels' precision (%) where ground truth
    exists (None otherwise)."""
    precision = (summary.get("quality") or {}).get("precision", {})
    rows = []
    for name, c in summary["classes"].items():
        share = round(100 * c["kept"] / c["predicted"], 4) if c["predicted"] else None
        rows.append([name, c["predicted"], c["kept"], share, c["threshold"], precision.get(name)])
    return table(["class", "predicted", "kept", "kept_percent", "threshold", "precision"], rows)


def pseudo_examples(store: PseudoLabelStore, thresholds: torch.Tensor, layout: DatasetLayout, subset: str,
                    class_names: Sequence[str], images: int, max_side: int) -> list[Any]:
    """Overlays of ``images`` unlabeled images (spread over the store) with the kept pseudo labels
    (``pseudo_label``: below-threshold pixels are 255), the ignored pixels (``ignored``: 1 where the
    threshold drops the model's label) and, where it exists, the ground truth."""
    legend = class_labels(class_names)
    names = store.names()
    shown = []
    for index in spread(images, len(names)):
        name = names[index]
        label, score = store.load(name)
        kept = apply_thresholds(label, score, thresholds, IGNORE_INDEX)
        masks = {"pseudo_label": kept, "ignored": ((kept == IGNORE_INDEX) & (label != IGNORE_INDEX)).astype(np.uint8)}
        legends = {"pseudo_label": legend, "ignored": {0: "kept", 1: "ignored (below threshold)"}}
        gt_path = layout.label_path(subset, name)
        if gt_path.is_file():
            gt = read_label(gt_path, layout.label_map)
            if gt.shape != kept.shape:
                gt = cv2.resize(gt, kept.shape[::-1], interpolation=cv2.INTER_NEAREST)
            masks["ground_truth"], legends["ground_truth"] = gt, legend
        image = shown_image(layout, subset, name, kept.shape)
        shown.append(overlay(image, masks, legends, name, max_side))
    return shown


def log_pseudo_labels(loggers: Sequence[Logger], step: int, summaries: Mapping[str, Mapping[str, Any]],
                      stores: Mapping[str, PseudoLabelStore], thresholds: Mapping[str, torch.Tensor],
                      layout: DatasetLayout, subset: str, class_names: Sequence[str],
                      media: Mapping[str, Any] | None) -> None:
    """Log a DMT phase's pseudo labels to W&B at ``step`` (the phase's first step): per model (the one whose
    labels the *other* model trains on) ``pseudo/<model>/classes`` and ``pseudo/<model>/examples``."""
    loggers = wandb_loggers(loggers)
    if not loggers or not is_rank_zero():
        return
    media = dict(media or {})
    images, max_side = int(media.get("pseudo_images", 4)), int(media.get("max_side", 512))
    payload: dict[str, Any] = {}
    for key, summary in summaries.items():
        payload[f"pseudo/{key}/classes"] = pseudo_table(summary)
        if images > 0:
            payload[f"pseudo/{key}/examples"] = pseudo_examples(
                stores[key], thresholds[key], layout, subset, class_names, images, max_side)
    for logger in loggers:
        logger.log_metrics(payload, step=step)
