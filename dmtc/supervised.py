"""Supervised training of one DeepLab-v2 on the labeled split: the baseline, and DMT's warm-up with one
model and no phases (Feng et al., Pattern Recognition 2022, §4.1: the "supervised" rows of its tables).

SGD + poly schedule (:mod:`dmtc.module`), the best checkpoint by val mIoU kept and re-validated.
Rerunning the same command in the same run folder resumes from Lightning's ``last.ckpt`` (or, if that is
unreadable, the previous one: :func:`dmtc.checkpoint_io.resume_checkpoint`).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from dmtc import interrupts
from dmtc.checkpoint_io import checkpoint_step, remove_resume_files, resume_checkpoint
from dmtc.data.build import build_datamodule
from dmtc.files import is_rank_zero
from dmtc.models.inits import build_model
from dmtc.report import supervised_results
from dmtc.speed import prepare_models
from dmtc.trainer import build_module, build_trainer

log = logging.getLogger(__name__)


def best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best-by-val checkpoint (a monitored ModelCheckpoint), else the newest one saved, else None."""
    saved = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.best_model_path]
    monitored = [cb for cb in saved if cb.monitor is not None]
    return (monitored or saved)[0].best_model_path if saved else None


def run_supervised(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume) model ``a`` on the labeled split as configured; return the results."""
    output_dir = Path(cfg.paths.output_dir)
    overwrite = bool(cfg.get("overwrite", False))
    if overwrite and is_rank_zero():
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)  # retrain from scratch: no stale best
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    start = time.perf_counter()
    datamodule, split = build_datamodule(cfg)
    log.info("%s split=%s sid=%s: %d labeled, %d unlabeled, %d val images", cfg.dataset.name, split.name, cfg.sid,
             len(split.labeled), len(split.unlabeled), len(split.val))
    module = build_module(cfg, prepare_models(cfg, {"a": build_model(cfg)}))
    trainer = build_trainer(cfg, stage="supervised (A)")
    checkpoints = output_dir / "checkpoints"
    resume = None if overwrite else resume_checkpoint(checkpoints, what="the training")
    if resume:
        log.info("resuming from %s (step %s)", resume, checkpoint_step(resume))
    with interrupts.deferred():
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    remove_resume_files(checkpoints, keep_last=True)  # last.ckpt stays: evaluation and docs name it
    best = best_checkpoint(trainer)
    trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    return supervised_results(cfg, split, module.val_summaries[module.primary], best, trainer.global_step,
                              time.perf_counter() - start)
