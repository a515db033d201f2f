"""Supervised training of one DeepLab-v2 on the labeled split (the baseline and DMT's warm-up step).

``train(cfg)`` generates/loads the data, trains with SGD + poly schedule, keeps the best checkpoint by val
mIoU, re-validates it and writes ``results.json`` in the run folder. Rerunning the same command in the same
run folder resumes from Lightning's ``last.ckpt``; a finished run is reported, not retrained.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from dmtc.builders import build_datamodule, build_model, build_module, build_trainer
from dmtc.errors import DMTCError
from dmtc.results import format_table, write_json

log = logging.getLogger(__name__)


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best-by-val checkpoint (a monitored ModelCheckpoint), else the newest one saved, else None."""
    saved = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.best_model_path]
    monitored = [cb for cb in saved if cb.monitor is not None]
    return (monitored or saved)[0].best_model_path if saved else None


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured method (``method.name``): ``supervised`` here, ``dmt`` and ``dmtc`` (DMT plus the
    contrastive term) in :func:`dmtc.pipeline.run_dmt`; return (and write) the results dictionary.

    A run folder that already holds ``results.json`` is finished: its results are returned without
    training (``overwrite=true`` retrains)."""
    results_path = Path(cfg.paths.output_dir) / "results.json"
    if results_path.is_file() and not cfg.get("overwrite", False):
        log.info("%s exists: this run is finished (pass overwrite=true or another run dir to retrain)", results_path)
        return json.loads(results_path.read_text())
    method = str(cfg.method.name)
    if method in ("dmt", "dmtc"):
        from dmtc.pipeline import run_dmt

        return run_dmt(cfg)
    if method != "supervised":
        raise DMTCError(f"method={method!r} is not implemented; choose supervised, dmt or dmtc")
    return train_supervised(cfg)


def train_supervised(cfg: DictConfig) -> dict[str, Any]:
    """Run supervised training as configured; return (and write) the results dictionary."""
    output_dir = Path(cfg.paths.output_dir)
    results_path = output_dir / "results.json"

    if cfg.get("overwrite", False) and int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(
            os.environ.get("NODE_RANK", "0")) == 0:
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)  # retrain from scratch: no stale best
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    start = time.perf_counter()
    datamodule, split = build_datamodule(cfg)
    log.info(
        "%s split=%s sid=%s: %d labeled, %d unlabeled, %d val images",
        cfg.dataset.name, split.name, cfg.sid, len(split.labeled), len(split.unlabeled), len(split.val),
    )
    module = build_module(cfg, {"a": build_model(cfg)})
    trainer = build_trainer(cfg)

    last = output_dir / "checkpoints" / "last.ckpt"
    resume = str(last) if last.is_file() and not cfg.get("overwrite", False) else None
    if resume:
        log.info("resuming from %s", resume)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)

    best = _best_checkpoint(trainer)
    trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    summary = module.val_summaries[module.primary]

    results = {
        "task": "train",
        "method": cfg.method.name,
        "dataset": cfg.dataset.name,
        "split": split.name,
        "sid": int(cfg.sid),
        "seed": int(cfg.seed),
        "backbone": cfg.backbone.name,
        "miou": summary["miou"],
        "per_class_iou": summary["per_class_iou"],
        "checkpoint": str(Path(best).resolve()) if best else None,
        "num_labeled": len(split.labeled),
        "num_val": len(split.val),
        "steps": int(trainer.global_step),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "output_dir": str(output_dir.resolve()),
    }
    if trainer.is_global_zero:
        write_json(results_path, results)
        print(format_table(f"{cfg.dataset.name} split={cfg.split} sid={cfg.sid}: val IoU (%)",
                           summary["per_class_iou"], summary["miou"]))
        log.info("results written to %s", results_path)
    return results
