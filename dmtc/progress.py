"""Progress people can read: a bar that names the stage in a terminal, plain log lines elsewhere.

In a terminal (stdout, where Lightning's bar writes, is a TTY) training shows Lightning's tqdm bar,
described by its stage (``phase 3/5 r=0.6 (A, B) · epoch 1``). Where output is not a terminal (CI, SLURM
logs, ``nohup``), carriage-return bars would fill the log with thousands of lines: :class:`LogProgress`
writes one plain line every ``log_every_n_steps`` training steps instead (stage, step / total, the logged
losses, speed and the stage's estimated time left) and one per validation. :class:`BannerOnce` lets
Lightning's start-up lines (accelerators, tips) through once per process, not once per DMT phase.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class StageProgress:
    """What a progress display (and a divergence or interrupt message) says about the stage it runs in (set
    by :func:`dmtc.trainer.build_trainer`)."""

    stage: str = "training"


class StageTQDMProgressBar(StageProgress, TQDMProgressBar):
    """Lightning's tqdm bar, its description naming the stage (``phase 3/5 r=0.6 (A, B) · epoch 1``)."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:  # noqa: D102
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"{self.stage} · epoch {trainer.current_epoch}")


class LogProgress(StageProgress, ProgressBar):
    """Plain log lines instead of a bar: every ``every_n_steps`` training steps ``<stage> step 40/232 (17%)
    train/a/loss=0.512 … 2.1 it/s, ETA 1m30s``, and one line per validation with its metrics (the
    end-of-stage re-validation of the best checkpoints says so)."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = max(1, int(every_n_steps))
        self.enabled = True
        self.started = 0.0
        self.first_step = 0

    def disable(self) -> None:  # noqa: D102
        self.enabled = False

    def enable(self) -> None:  # noqa: D102
        self.enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self.started, self.first_step = time.perf_counter(), trainer.global_step

    def _line(self, trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> str:
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        return f"{self.stage} {what} {shown}".rstrip()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:  # noqa: D102
        step = trainer.global_step
        if not self.enabled or step % self.every_n_steps:
            return
        total = int(trainer.estimated_stepping_batches)
        elapsed = time.perf_counter() - self.started
        done = max(step - self.first_step, 1)
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {format_duration((total - step) / rate)}" if rate > 0 and total > step else ""
        what = f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"
        log.info("%s, %.2f it/s%s", self._line(trainer, pl_module, what), rate, eta)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if not self.enabled or trainer.sanity_checking:
            return
        # trainer.validate after a fit: the best checkpoints scored again for the record
        what = "best checkpoints re-validated:" if trainer.state.fn == TrainerFn.VALIDATING else "validation at step"
        log.info("%s", self._line(trainer, pl_module, what if what.endswith(":") else f"{what} {trainer.global_step}:"))


def progress_bar(refresh_rate: int = 10, log_every_n_steps: int = 50) -> ProgressBar:
    """The progress display for this process: :class:`StageTQDMProgressBar` (refreshed every
    ``refresh_rate`` batches) when stdout is a terminal, else :class:`LogProgress` (a line every
    ``log_every_n_steps`` steps)."""
    if sys.stdout.isatty():
        return StageTQDMProgressBar(refresh_rate=refresh_rate)
    return LogProgress(every_n_steps=log_every_n_steps)


class BannerOnce(logging.Filter):
    """Drops an informational record whose message this filter has seen before (Lightning prints
    ``GPU available: …``, ``TPU available: …`` and its tips at every Trainer: a DMT run has one per phase)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        if record.levelno > logging.INFO:
            return True
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


BANNER_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_BANNER = BannerOnce()


def banner_once() -> None:
    """Install :class:`BannerOnce` on Lightning's rank-zero loggers (idempotent)."""
    for name in BANNER_LOGGERS:
        logger = logging.getLogger(name)
        if _BANNER not in logger.filters:
            logger.addFilter(_BANNER)
