"""Evaluate any checkpoint (ours or a DMT/DMTC release file) on the validation set.

mIoU = mean over classes present in prediction or ground truth of TP / (TP + FP + FN), 255 ignored
(see :mod:`dmtc.metrics`). Predictions are made at the evaluation size of the dataset config (logits
upsampled bilinearly to label resolution).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from dmtc.builders import build_layout, build_model, build_module, build_trainer, input_normalization, prepare_dataset
from dmtc.data.datasets import SegmentationDataset
from dmtc.data.transforms import build_eval_transform
from dmtc.errors import DMTCError
from dmtc.models import load_dmt_checkpoint
from dmtc.results import format_table, write_json

log = logging.getLogger(__name__)


def build_val_loader(cfg: DictConfig) -> DataLoader:
    """DataLoader over the dataset's validation images with the evaluation transform."""
    prepare_dataset(cfg)
    layout = build_layout(cfg)
    ds = cfg.dataset
    names = layout.names(ds.val_subset)
    layout.check_files(ds.val_subset, names)
    eval_base = list(ds.eval_size) if ds.get("eval_size") else None
    transform = build_eval_transform(base_size=eval_base, **input_normalization(cfg))
    dataset = SegmentationDataset(layout, ds.val_subset, names, transform)
    return DataLoader(
        dataset,
        batch_size=int(ds.val_batch_size),
        num_workers=int(ds.num_workers),
        pin_memory=torch.cuda.is_available(),
    )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt`` on the validation set; write and return ``results.json``'s contents."""
    if not cfg.get("ckpt"):
        raise DMTCError("no checkpoint given: run `python evaluate.py ckpt=/path/to/checkpoint`")
    ckpt = Path(cfg.ckpt)
    if not ckpt.is_file():
        raise DMTCError(f"checkpoint {ckpt} (ckpt=) does not exist")
    start = time.perf_counter()
    model = build_model(cfg)
    report = load_dmt_checkpoint(model, ckpt, model_key=cfg.get("model_key"), allow_head_mismatch=False)
    log.info("loaded %d tensors from %s", len(report.loaded), ckpt)
    loader = build_val_loader(cfg)
    module = build_module(cfg, {"a": model})
    trainer = build_trainer(cfg)
    trainer.validate(module, dataloaders=loader, verbose=False)
    summary = module.val_summaries["a"]
    results = {
        "task": "evaluate",
        "dataset": cfg.dataset.name,
        "backbone": cfg.backbone.name,
        "checkpoint": str(ckpt.resolve()),
        "miou": summary["miou"],
        "per_class_iou": summary["per_class_iou"],
        "num_val": len(loader.dataset),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    if trainer.is_global_zero:
        path = write_json(Path(cfg.paths.output_dir) / "results.json", results)
        print(format_table(f"{cfg.dataset.name} val IoU (%) of {ckpt.name}", summary["per_class_iou"], summary["miou"]))
        log.info("results written to %s", path)
    return results
