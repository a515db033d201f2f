"""Labeling the unlabeled split once per model per phase, and ``python pseudo_label.py``.

DMT (Feng et al., Pattern Recognition 2022, §3, Algorithm 1): at the start of phase k each model of phase
k-1 predicts every unlabeled image; the class-balanced curriculum keeps, per class c, the most confident
fraction r_k of the pixels predicted as c. Here one forward pass per model per phase fills a
:class:`~dmtc.pseudo_labels.PseudoLabelStore` (label + confidence PNGs) and a per-class confidence
histogram; thresholds for r_k come from the histogram and are applied when the training set loads a map.

Under DDP every rank labels ``names[rank::world]``, the histograms are summed (all-reduce) and rank 0
writes the manifest with all names, last: a store interrupted mid-write has no manifest and is never
trusted (it is cleared and rewritten).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dmtc.data.datasets import read_image, read_label
from dmtc.data.layouts import DatasetLayout
from dmtc.data.transforms import build_eval_transform
from dmtc.errors import DMTCError
from dmtc.metrics import make_miou_metric, summarize
from dmtc.pseudo_labels import (
    SCORE_FORMAT,
    ConfidenceHistogram,
    PseudoLabelStore,
    apply_thresholds,
    predict_to_store,
)

log = logging.getLogger(__name__)

__all__ = ["label_images", "pseudo_label", "pseudo_label_summary"]


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
    from dmtc.builders import input_normalization, resize_options

    base = list(cfg.dataset.base_size) if cfg.dataset.get("base_size") else None
    return build_eval_transform(base_size=base, **resize_options(cfg), **dict(inputs or input_normalization(cfg)))


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
    device: torch.device | str | None = None,
) -> tuple[PseudoLabelStore, ConfidenceHistogram, bool]:
    """Label ``names`` with ``model`` into a store at ``directory``; ``(store, histogram, reused)``.

    A store whose manifest matches ``meta`` (plus the class count and name count) is reused as it is;
    anything else there (a store interrupted mid-write, another model's labels) is cleared and rewritten.
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
                        num_workers=num_workers, pin_memory=torch.cuda.is_available())
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
    ignore_index: int = 255,
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


def pseudo_label(cfg: DictConfig) -> dict[str, Any]:
    """``python pseudo_label.py ckpt=PATH [model_key=a|b] [names=unlabeled|labeled|val] [ratio=r]``.

    Labels the split's unlabeled (or labeled, or val) images with one checkpoint (dmtc or DMT/DMTC file)
    into ``<run dir>/store`` and writes ``<run dir>/summary.json`` (see :func:`pseudo_label_summary`).
    """
    from dmtc.builders import build_layout, prepare_dataset, resolve_split
    from dmtc.from_checkpoint import restore
    from dmtc.results import write_json

    if not cfg.get("ckpt"):
        raise DMTCError("no checkpoint given: run `python pseudo_label.py ckpt=/path/to/checkpoint`")
    ckpt = Path(cfg.ckpt)
    ratio = float(cfg.ratio)
    if not 0.0 < ratio <= 1.0:
        raise DMTCError(f"ratio={cfg.ratio} must be in (0, 1]: the fraction of each class's pixels kept")
    # architecture, input pipeline and (where recorded) dataset, split and sid come from the checkpoint
    restored = restore(cfg, ckpt, cfg.get("model_key"))
    cfg, model = restored.cfg, restored.model
    prepare_dataset(cfg)
    layout = build_layout(cfg)
    split = resolve_split(cfg, layout)
    which = str(cfg.names)
    ds = cfg.dataset
    if which == "unlabeled":
        names, subset = split.unlabeled, split.unlabeled_subset
    elif which == "labeled":
        names, subset = split.labeled, ds.train_subset
    elif which == "val":
        names, subset = split.val, ds.val_subset
    else:
        raise DMTCError(f"names={which!r}: choose unlabeled, labeled or val")
    if not names:
        raise DMTCError(f"split={cfg.split} sid={cfg.sid} has no {which} images (split=1 labels everything)")
    layout.check_files(subset, names, labels=False)
    out = Path(cfg.paths.output_dir)
    store, hist, _ = label_images(
        model, layout, subset, names, out / "store",
        meta={"checkpoint": str(ckpt.resolve()), "model_key": cfg.get("model_key")},
        num_classes=int(ds.num_classes), transform=labeling_transform(cfg, restored.inputs),
        batch_size=int(ds.val_batch_size), num_workers=int(ds.num_workers),
    )
    thresholds = hist.thresholds(ratio)
    summary = {
        "task": "pseudo_label",
        "checkpoint": str(ckpt.resolve()),
        "dataset": ds.name, "split": str(cfg.split), "sid": int(cfg.sid), "names": which,
        "store": str(store.directory.resolve()),
        **pseudo_label_summary(store, hist, thresholds, list(ds.class_names), ratio, layout=layout, subset=subset),
    }
    write_json(out / "summary.json", summary)
    quality = summary.get("quality")
    extra = f", kept labels' mIoU {quality['miou']:.2f}" if quality else ""
    print(f"pseudo labels of {len(names)} {which} images → {store.directory} "
          f"(ratio {ratio}: kept {summary['kept_fraction'] * 100:.1f}% of pixels{extra})")
    return summary
