"""Lightning callbacks dmtc adds to Lightning's own."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["last_checkpoint_callback"]


def last_checkpoint_callback(dirpath: str | Path) -> ModelCheckpoint:
    """``<dirpath>/last.ckpt``, rewritten at every validation: the point a killed run resumes from.

    Lightning's ``save_last=True`` only refreshes last.ckpt when a top-k checkpoint was saved in the same
    step, i.e. when the monitored mIoU improved; a run killed after validations without improvement would
    resume (and redo) from the last improvement instead of the last validation.
    """
    return ModelCheckpoint(dirpath=dirpath, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
