"""Labeling: each model of phase k-1 labels the unlabeled split once (DMT, Feng et al., Pattern
Recognition 2022, §3, Algorithm 1).

One forward pass per model per phase fills a :class:`~dmtc.dmt.store.PseudoLabelStore` (label + confidence
PNGs) and a per-class confidence histogram (:mod:`dmtc.dmt.curriculum`); thresholds for r_k come from the
histogram and are applied when the phase's dataset loads a map; :func:`pseudo_label_summary` reports what
a ratio keeps per class and, where ground truth exists, how correct the kept labels are (never used for
training).

Under DDP every rank labels ``names[rank::world]``, the histograms are summed (all-reduce) and rank 0
writes the manifest with all names, last: a store interrupted mid-write has no manifest and is never
trusted (it is cleared and rewritten).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dmtc.data.build import resize_options
from dmtc.data.datasets import read_image, read_label
from dmtc.data.layouts import IGNORE_INDEX, DatasetLayout
from dmtc.data.loading import loader_options
from dmtc.data.transforms import build_eval_transform
from dmtc.dmt.curriculum import ConfidenceHistogram, apply_thresholds
from dmtc.dmt.scores import CODE_MAX, SCORE_FORMAT, confidence_score, quantize_score
from dmtc.dmt.store import PseudoLabelStore
from dmtc.dmt.store_writer import BackgroundStoreWriter
from dmtc.metrics import make_miou_metric, summarize
from dmtc.models.deeplab import model_align_corners, upsample_logits
from dmtc.models.inits import input_normalization

log = logging.getLogger(__name__)

class _LabelingDataset(Dataset):
    """Images for labeling: ``{"image", "name", "size"}`` with ``size`` the transformed image's (H, W)."""

    def __init__(self, layout: DatasetLayout, subset: str, names: Sequence[str], transform: Any) -> None:
        self.layout, self.subset, self.names, self.transform = layout, subset, list(names), transform

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from torchvision import tv_tensors

        name = self.names[index]
        image = read_image(self.layout.image_path(self.subset, name))
        image_t = self.transform(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)))
        image_t = image_t.as_subclass(torch.Tensor)
        return {"image": image_t, "name": name, "size": torch.tensor(image_t.shape[-2:], dtype=torch.int64)}


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def labeling_transform(cfg: DictConfig, inputs: Mapping[str, Any] | None = None) -> Any:
    """Evaluation normalisation (``inputs``, default the config's ``backbone.init`` pipeline) at the training
    base size (labels are made where training crops)."""
    base = list(cfg.dataset.base_size) if cfg.dataset.get("base_size") else None
    return build_eval_transform(base_size=base, **resize_options(cfg), **dict(inputs or input_normalization(cfg)))


@torch.no_grad()
def predict_to_store(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    store: PseudoLabelStore,
    histogram: ConfidenceHistogram,
    device: torch.device | str,
    *,
    amp: bool = False,
    writer_threads: int | None = None,
) -> list[str]:
    """One forward pass per image (DMT §3): store argmax label and confidence score, fill the histogram.

    ``loader`` yields ``{"image": N×3×H×W normalised float, "name": list[str], "size": N×2 (H, W)}``
    (``size`` optional: images padded at the bottom/right are cropped back to it). ``model(image)``
    must return ``{"logits": N×C×h×w}`` (any stride); logits are upsampled bilinearly to H×W with the
    model's ``align_corners`` (:func:`dmtc.models.upsample_logits`), then label = argmax and
    score = ``-log(1 - max softmax)`` (:func:`confidence_score`). The score is quantised to the stored
    16-bit code before it enters the histogram, so thresholds agree exactly with what
    :meth:`PseudoLabelStore.load` returns. Only the images the loader yields are written (each DDP rank
    its own shard); the caller all-reduces the histogram and finalizes the store. The model's
    train/eval mode is restored. Returns the names written.

    The device never waits for the host: the histogram is accumulated on ``device`` (moved back to the CPU
    at the end), and the PNGs are encoded and written by ``writer_threads`` background threads
    (:class:`~dmtc.dmt.store_writer.BackgroundStoreWriter`, which copies each batch's maps to the host
    asynchronously); the files are byte for byte those of a synchronous write. The per-batch host work is
    reading ``size`` (a host tensor from the loader) and queueing the writes.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    written: list[str] = []
    histogram.to(device)
    try:
        with BackgroundStoreWriter(store, threads=writer_threads) as writer:
            for batch in loader:
                images = batch["image"].to(device, non_blocking=True)
                with torch.autocast(device_type=device.type, enabled=amp):
                    logits = model(images)["logits"]
                height, width = images.shape[-2:]
                if logits.shape[1] > 255:
                    raise ValueError(f"{logits.shape[1]} classes do not fit the uint8 label PNGs (max 255)")
                logits = upsample_logits(logits.float(), (height, width), align_corners=model_align_corners(model))
                label, score = confidence_score(logits, dim=1)
                code, score = quantize_score(score)
                sizes = batch.get("size")
                if sizes is None:
                    sizes = torch.tensor([[height, width]] * images.shape[0])
                sizes = torch.as_tensor(sizes).long().reshape(-1, 2)
                rows = torch.arange(height, device=device).view(1, -1, 1)
                cols = torch.arange(width, device=device).view(1, 1, -1)
                size_t = sizes.to(device, non_blocking=True)
                inside = (rows < size_t[:, 0].view(-1, 1, 1)) & (cols < size_t[:, 1].view(-1, 1, 1))
                label_in = label.masked_fill(~inside, -1)
                if histogram.bins == CODE_MAX + 1:
                    histogram.update_codes(label_in, code)  # = update(label_in, score), without the bin search
                else:
                    histogram.update(label_in, score)
                writer.submit(batch["name"], label.to(torch.uint8), code, sizes.tolist())
                written.extend(batch["name"])
    finally:
        histogram.to("cpu")
        model.train(was_training)
    return written


def label_images(
    model: nn.Module,
    layout: DatasetLayout,
    subset: str,
    names: Sequence[str],
    directory: Path,
    *,
    meta: Mapping[str, Any],
    num_classes: int,
    transform: Any,
    batch_size: int = 1,
    num_workers: int = 0,
    prefetch_factor: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[PseudoLabelStore, ConfidenceHistogram, bool]:
    """Label ``names`` with ``model`` into a store at ``directory``; ``(store, histogram, reused)``.

    A store whose manifest matches ``meta`` (plus the class count and name count) is reused as it is;
    anything else there (a store interrupted mid-write, another model's labels) is cleared and rewritten.
    Labeling runs in float32 whatever the training precision (TF32 on CUDA, :mod:`dmtc.speed`): the
    curriculum ranks exact scores (README "Fidelity": the reference's fp16 softmax ties confident pixels).
    """
    store = PseudoLabelStore(directory)
    expected = {**dict(meta), "num_classes": int(num_classes), "num_images": len(names),
                "score_format": SCORE_FORMAT}
    if store.is_complete(expected) and sorted(store.names()) == sorted(names):
        hist = store.load_histogram()
        if hist.num_classes == num_classes:
            log.info("reusing complete pseudo-label store %s", directory)
            return store, hist, True
    rank, world = _dist_info()
    if rank == 0:
        if store.manifest_path.exists() or directory.exists():
            log.info("pseudo-label store %s is incomplete or stale: rewriting it", directory)
        store.clear()
    _barrier()
    shard = list(names)[rank::world]
    loader = DataLoader(_LabelingDataset(layout, subset, shard, transform), batch_size=batch_size,
                        **loader_options(num_workers, prefetch_factor=prefetch_factor))
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    model.to(device)
    hist = ConfidenceHistogram(num_classes)
    start = time.perf_counter()
    predict_to_store(model, loader, store, hist, device)
    hist.all_reduce()
    _barrier()
    if rank == 0:
        store.finalize(expected, names=names, histogram=hist)
    _barrier()
    log.info("labeled %d images into %s in %.1fs", len(names), directory, time.perf_counter() - start)
    return store, hist, False


def pseudo_label_summary(
    store: PseudoLabelStore,
    histogram: ConfidenceHistogram,
    thresholds: torch.Tensor,
    class_names: Sequence[str],
    ratio: float,
    *,
    layout: DatasetLayout | None = None,
    subset: str | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Any]:
    """Per class ``{"predicted", "kept", "threshold", "threshold_score"}`` for ``ratio``: pixel counts, the
    confidence threshold p_c (float64, may print as 1.0 when p_c > 1 - 1e-16) and the score threshold
    ``-log(1 - p_c)`` the dataset compares against (None for a class nobody predicts). With a layout whose
    labels exist for every stored image (the synthetic set), also the kept pseudo labels' quality against
    ground truth: ``quality = {"miou", "per_class_iou", "precision": {class: % of kept pixels that are
    correct}}`` over pixels kept and not ignored in the ground truth (never used for training)."""
    predicted, kept = histogram.predicted(), histogram.kept(thresholds)
    classes = {
        name: {"predicted": int(predicted[c]), "kept": int(kept[c]),
               "threshold": -math.expm1(-float(thresholds[c])) if torch.isfinite(thresholds[c]) else None,
               "threshold_score": float(thresholds[c]) if torch.isfinite(thresholds[c]) else None}
        for c, name in enumerate(class_names)
    }
    total_pred = int(predicted.sum())
    summary: dict[str, Any] = {
        "ratio": float(ratio),
        "num_images": len(store.names()),
        "kept_fraction": round(int(kept.sum()) / total_pred, 6) if total_pred else 0.0,
        "classes": classes,
    }
    names = store.names()
    if layout is not None and subset is not None and names and all(
        layout.label_path(subset, n).is_file() for n in names
    ):
        n = len(class_names)
        metric = make_miou_metric(n, ignore_index)
        for name in names:
            label, conf = store.load(name)
            pseudo = apply_thresholds(label, conf, thresholds, ignore_index)
            gt = read_label(layout.label_path(subset, name), layout.label_map)
            if gt.shape != pseudo.shape:
                gt = cv2.resize(gt, pseudo.shape[::-1], interpolation=cv2.INTER_NEAREST)
            valid = (pseudo != ignore_index) & (gt != ignore_index) & (gt < n)
            metric.update(torch.from_numpy(pseudo[valid].astype(np.int64)),
                          torch.from_numpy(gt[valid].astype(np.int64)))
        confmat = metric.confmat
        quality = summarize(confmat, class_names)
        cols = confmat.sum(0).double()
        quality["precision"] = {
            name: (round(float(confmat[c, c] / cols[c]) * 100, 4) if cols[c] > 0 else None)
            for c, name in enumerate(class_names)
        }
        summary["quality"] = quality
    return summary
