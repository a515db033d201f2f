"""W&B panels that show what DMT does, beyond scalar curves (``logger=wandb`` / ``csv_wandb``).

* At each validation (:class:`WandbMedia`, added to a run's Trainers by :func:`dmtc.trainer.build_trainer`
  when it logs to W&B): a table ``val/<model>/per_class`` (class, IoU) and mask overlays
  ``val/<model>/examples`` of a fixed set of val images (the image with its ground-truth and predicted
  masks, class names from the dataset) for every model and, with two, their ensemble (``ens``).
* At each DMT phase (:func:`dmtc.dmt.pseudo_panels.log_pseudo_labels`, after labeling): per model a table
  ``pseudo/<model>/classes`` (class, predicted and kept pixels, kept %, the confidence threshold of the
  phase's ratio r_k, and where ground truth exists the kept labels' precision) and overlays
  ``pseudo/<model>/examples`` of a few unlabeled images with the model's kept pseudo labels and the pixels
  its threshold ignores.
* At the end of a sweep (:func:`log_sweep_summary`): the sweep's summary table (:mod:`dmtc.summary`) as
  ``summary/table`` in one extra W&B run of the sweep's group, ``job_type=summary``.

Uploads stay bounded by the ``media`` config keys: ``media.val_images`` and ``media.pseudo_images`` images per
panel (0 turns a panel off) and ``media.max_side`` pixels on an image's longest side. Only rank 0 logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger, WandbLogger

from dmtc.data.datasets import read_image
from dmtc.data.layouts import IGNORE_INDEX, DatasetLayout
from dmtc.metrics import predicted_class


def wandb_loggers(loggers: Sequence[Logger]) -> list[Logger]:
    """The loggers among ``loggers`` that write to W&B (a :class:`~lightning.pytorch.loggers.WandbLogger`, or a
    :class:`dmtc.loggers.StepOffsetLogger` wrapping one: media then share the run's step axis)."""
    found = []
    for logger in loggers:
        inner = logger
        while not isinstance(inner, WandbLogger) and hasattr(inner, "logger") and isinstance(inner.logger, Logger):
            inner = inner.logger
        if isinstance(inner, WandbLogger):
            found.append(logger)
    return found


def spread(count: int, available: int) -> list[int]:
    """``count`` indices spread evenly over ``range(available)`` (first and last included; all when fewer):
    the same images at every validation and phase of a run."""
    count = min(int(count), int(available))
    if count <= 0:
        return []
    return sorted({int(round(i)) for i in np.linspace(0, available - 1, count)})


def class_labels(class_names: Sequence[str], ignore_index: int = IGNORE_INDEX) -> dict[int, str]:
    """W&B's mask legend: class id → name, and the ignore value."""
    return {**dict(enumerate(class_names)), ignore_index: "ignore"}


def bounded(image: np.ndarray, masks: Mapping[str, np.ndarray], max_side: int
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``image`` (H×W×3) and its H×W ``masks`` scaled so the longest side is at most ``max_side`` (area
    interpolation for the image, nearest for masks); unchanged when already small enough."""
    height, width = image.shape[:2]
    scale = min(1.0, float(max_side) / max(height, width)) if max_side else 1.0
    if scale >= 1.0:
        return image, dict(masks)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = {k: cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) for k, m in masks.items()}
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), small


def overlay(image: np.ndarray, masks: Mapping[str, np.ndarray], labels: Mapping[str, Mapping[int, str]],
            caption: str, max_side: int) -> Any:
    """A ``wandb.Image`` of ``image`` with one toggleable mask layer per entry of ``masks`` (legend from
    ``labels[layer]``), scaled to ``max_side``."""
    import wandb

    image, masks = bounded(image, masks, max_side)
    layers = {k: {"mask_data": m.astype(np.uint8), "class_labels": dict(labels[k])} for k, m in masks.items()}
    return wandb.Image(image, masks=layers, caption=caption)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    """A ``wandb.Table`` of ``rows``."""
    import wandb

    return wandb.Table(columns=list(columns), data=[list(r) for r in rows])


def shown_image(layout: DatasetLayout, subset: str, name: str, shape: Sequence[int]) -> np.ndarray:
    """Image ``name`` of ``subset`` as RGB uint8 at ``shape`` (H, W): the resolution its labels are at."""
    image = read_image(layout.image_path(subset, name))
    if image.shape[:2] != tuple(shape):
        image = cv2.resize(image, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_AREA)
    return image


class WandbMedia(Callback):
    """At the end of every validation (not the sanity check), log each model's per-class IoU table and its
    predictions on ``images`` fixed val images (spread over the val split) as mask overlays on W&B.

    The predictions come from the module's :meth:`dmtc.module.SegmentationModule.predict_probs` (the same
    forward as validation; the ensemble is the mean of the models' softmaxes), run on rank 0 only, in eval
    mode, without gradients.
    """

    def __init__(self, images: int = 4, max_side: int = 512) -> None:
        self.images, self.max_side = int(images), int(max_side)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        loggers = wandb_loggers(trainer.loggers)
        if trainer.sanity_checking or not loggers or not trainer.is_global_zero:
            return
        summaries = getattr(pl_module, "val_summaries", {})
        payload: dict[str, Any] = {}
        for key, summary in summaries.items():
            payload[f"val/{key}/per_class"] = table(
                ["class", "iou"], [[c, iou] for c, iou in summary["per_class_iou"].items()])
        payload.update(self.examples(trainer, pl_module))
        if payload:
            for logger in loggers:
                logger.log_metrics(payload, step=trainer.global_step)

    def examples(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, list[Any]]:
        """``{"val/<model>/examples": [wandb.Image, ...]}`` for the fixed val images; empty when the val
        data are not image files of a dataset layout (nothing to show them from)."""
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, Sequence) else loaders
        dataset = getattr(loader, "dataset", None)
        if self.images <= 0 or not all(hasattr(dataset, a) for a in ("layout", "subset", "names")):
            return {}
        names = list(pl_module.class_names)
        legend = class_labels(names)
        shown: dict[str, list[Any]] = {}
        for index in spread(self.images, len(dataset)):
            item = dataset[index]
            label = item["label"]
            with torch.no_grad():
                probs = pl_module.predict_probs(item["image"][None].to(pl_module.device), label.shape[-2:])
            gt = label.numpy().astype(np.uint8)
            image = shown_image(dataset.layout, dataset.subset, item["name"], gt.shape)
            for key, p in probs.items():
                pred = predicted_class(p)[0].cpu().numpy().astype(np.uint8)
                shown.setdefault(f"val/{key}/examples", []).append(overlay(
                    image, {"ground_truth": gt, "prediction": pred},
                    {"ground_truth": legend, "prediction": legend}, f"{item['name']} ({key})", self.max_side))
        return shown


def summary_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The sweep summary's rows (:func:`dmtc.summary.summarize_runs`) as table columns and rows: setting,
    method, dataset, split, n, mean and std of final mIoU, warm-up mIoU and gain, published and difference."""
    columns = ["setting", "method", "dataset", "split", "n", "sids", "miou_mean", "miou_std", "warmup_miou_mean",
               "warmup_miou_std", "gain_mean", "gain_std", "ensemble_mean", "published", "vs_published"]
    rows = []
    for row in summary["rows"]:
        def stat(key: str, part: str, row: Mapping[str, Any] = row) -> float | None:
            return (row.get(key) or {}).get(part)
        rows.append([row["label"], row["method"], row["dataset"], row["split"], row["n"],
                     ",".join(map(str, row["sids"])), stat("miou", "mean"), stat("miou", "std"),
                     stat("warmup_miou", "mean"), stat("warmup_miou", "std"), stat("gain", "mean"),
                     stat("gain", "std"), stat("ensemble", "mean"), row["published"], row["vs_published"]])
    return columns, rows


def log_sweep_summary(sweep_dir: Path, summary: Mapping[str, Any], wandb_node: Mapping[str, Any]) -> str | None:
    """Log the sweep's summary table once, as ``summary/table`` of a W&B run named ``<sweep>-summary`` in the
    sweep's group (``job_type=summary``, project/entity as the runs' ``logger.wandb``), written under
    ``sweep_dir``; returns its run id (None when W&B is disabled)."""
    import wandb

    node = dict(wandb_node)
    name = Path(sweep_dir).name
    group = node.get("group") or name
    run = wandb.init(project=node.get("project"), entity=node.get("entity"), group=group, job_type="summary",
                     name=f"{name}-summary", dir=str(sweep_dir), mode="offline" if node.get("offline") else None,
                     reinit="finish_previous")
    try:
        columns, rows = summary_rows(summary)
        run.log({"summary/table": table(columns, rows)})
        run.summary.update({"summary/settings": len(rows), "summary/unfinished": len(summary["unfinished"])})
        return None if run.disabled else run.id
    finally:
        run.finish()
