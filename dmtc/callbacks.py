"""Lightning callbacks dmtc adds to Lightning's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

__all__ = ["ValidateAtEnd", "last_checkpoint_callback"]


class ValidateAtEnd(Callback):
    """Validate after the last training step too, as the reference DMT code does.

    The reference validates every ``val_num_steps`` steps *and* after the final step of each training
    (``current_step_num == epochs · len(loader) - 1``), so the fully decayed poly-schedule model competes for
    "best checkpoint". Lightning validates only every ``val_check_interval`` steps; when the last step is not
    on that grid this callback asks the loop to stop at it (``trainer.should_stop``, Lightning's public early
    stopping signal, which runs one validation before the loop ends). Training ends there anyway.
    """

    def __init__(self) -> None:
        self.total: float = float("inf")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self.total = trainer.estimated_stepping_batches  # the fit's last step, once per fit
        # resumed from the checkpoint of the last step's validation (the run stopped before the stage was
        # recorded as done): nothing is left to train, and Lightning would otherwise restart the epoch that
        # validation interrupted and add a step
        trainer.should_stop |= trainer.global_step >= self.total

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # noqa: D102
        if trainer.global_step >= self.total:
            trainer.should_stop = True


def last_checkpoint_callback(dirpath: str | Path) -> ModelCheckpoint:
    """``<dirpath>/last.ckpt``, rewritten at every validation: the point a killed run resumes from.

    Lightning's ``save_last=True`` only refreshes last.ckpt when a top-k checkpoint was saved in the same
    step, i.e. when the monitored mIoU improved; a run killed after validations without improvement would
    resume (and redo) from the last improvement instead of the last validation.
    """
    return ModelCheckpoint(dirpath=dirpath, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
