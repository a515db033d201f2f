"""Ctrl-C, SIGINT and SIGTERM stop a run cleanly: the current step is saved, the rerun continues from it.

:func:`handle_interrupts` (around each entry point's task, :func:`dmtc.cli.run_entry`) installs handlers for
SIGINT and SIGTERM in the main process (SIGUSR1 is left to Lightning's SLURM requeue):

* **while a Trainer fits** (:func:`deferred`, around ``trainer.fit``) a signal is only recorded; Lightning's
  own graceful stop (its SIGTERM handler: ``trainer.received_sigterm``, then ``SIGTERMException`` at the end
  of the current step, after its optimizer and scheduler steps) ends the fit, and :class:`SaveOnInterrupt`
  saves that step as ``last.ckpt`` (atomically, :mod:`dmtc.checkpoint_io`) before the exception leaves the
  Trainer. A SIGINT is passed on to Lightning as a SIGTERM;
* **anywhere else** (labeling, data preparation, the re-validation of a stage's best checkpoints) the
  signal raises :class:`Interrupted` at once: atomic writes remove their temporary files and an unfinished
  pseudo-label store has no manifest, so nothing half-written is trusted by the rerun.

Either way the entry point prints one line ending in "rerun the same command to continue" and exits with
128 + the signal number. A second Ctrl-C while stopping stops at once (the last saved checkpoint is kept).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dmtc.progress import StageProgress

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run was stopped by signal ``signum`` (not an ``Exception``: no ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


@dataclass
class _State:
    """What the handlers know (signals are per process, so is this)."""

    owner: int | None = None  # pid that installed the handlers (forked DataLoader workers are not it)
    deferred: int = 0  # > 0 while a Trainer fits
    pending: int | None = None  # the first signal received
    saved: tuple[Path, int, str] | None = None  # (checkpoint, step, stage) saved on the interrupt


_STATE = _State()


def signal_name(signum: int) -> str:
    """``SIGINT (Ctrl-C)`` or ``SIGTERM``."""
    name = signal.Signals(signum).name
    return f"{name} (Ctrl-C)" if signum == signal.SIGINT else name


def _handler(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _STATE.owner:  # a forked worker: behave as if nothing were installed
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _STATE.pending is not None:
        if signum == signal.SIGINT:  # a second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        return  # a repeated SIGTERM (SLURM, a supervisor): the stop is under way
    _STATE.pending = signum
    if _STATE.deferred:
        log.warning("%s received: stopping at the end of the current step (Ctrl-C again to stop at once)",
                    signal_name(signum))
        if signum != signal.SIGTERM:  # Lightning's graceful stop listens to SIGTERM only
            signal.raise_signal(signal.SIGTERM)
        return
    raise Interrupted(signum)


class _QuietLightningSigterm(logging.Filter):
    """Drops Lightning's ``Received SIGTERM: 15`` (our warning already names the signal, which for a Ctrl-C
    that we pass on to Lightning as a SIGTERM is not SIGTERM)."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        return "Received SIGTERM" not in record.getMessage()


_LIGHTNING_SIGNALS = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")
_QUIET = _QuietLightningSigterm()


@contextlib.contextmanager
def handle_interrupts() -> Iterator[None]:
    """Install the handlers for the duration (main thread only; elsewhere a no-op) and restore the
    previous ones after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    saved_state = (_STATE.owner, _STATE.deferred, _STATE.pending, _STATE.saved)
    _STATE.owner, _STATE.deferred, _STATE.pending, _STATE.saved = os.getpid(), 0, None, None
    for s in SIGNALS:
        signal.signal(s, _handler)
    _LIGHTNING_SIGNALS.addFilter(_QUIET)
    try:
        yield
    finally:
        _LIGHTNING_SIGNALS.removeFilter(_QUIET)
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _STATE.owner, _STATE.deferred, _STATE.pending, _STATE.saved = saved_state


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Around ``trainer.fit``: a signal stops the fit at the next step boundary (saved by
    :class:`SaveOnInterrupt`) instead of wherever it lands; one that came too late for that (during the
    last step) raises :class:`Interrupted` once the fit has returned."""
    _STATE.deferred += 1
    try:
        yield
    finally:
        _STATE.deferred -= 1
    if _STATE.pending is not None and _STATE.owner == os.getpid():
        raise Interrupted(_STATE.pending)


def pending() -> int | None:
    """The signal that asked this process to stop, if any."""
    return _STATE.pending


def saved() -> tuple[Path, int, str] | None:
    """``(checkpoint, step, stage)`` that :class:`SaveOnInterrupt` wrote on the interrupt, if any."""
    return _STATE.saved


def is_interrupt(err: BaseException) -> bool:
    """Whether ``err`` is a stop asked by a signal (ours or Lightning's SIGTERM stop)."""
    return isinstance(err, (Interrupted, SIGTERMException))


class SaveOnInterrupt(StageProgress, Callback):
    """On an interrupt during training, save the current step as the stage's ``last.ckpt`` (the file the
    rerun resumes from; the folder of the Trainer's ``last`` checkpoint callback).

    Only at a step boundary (Lightning's ``SIGTERMException``, raised after the step's optimizer and
    scheduler updates) or after a validation: never during the sanity check or evaluation-only runs, and
    never on other exceptions (a diverged run keeps its last good checkpoint, :mod:`dmtc.divergence`).
    A SIGINT recorded while fitting is handed to Lightning as a SIGTERM at the next step's end. A step the
    Trainer has saved already (a validation's ``last.ckpt``) is not saved twice, and a fit stopped before
    its first step saves nothing (its resume checkpoint is still there).
    """

    def __init__(self) -> None:
        super().__init__()
        self._start = 0
        self._saved_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._start = self._saved_step = int(trainer.global_step)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
                           ) -> None:  # noqa: D102
        self._saved_step = int(trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:  # noqa: D102
        if _STATE.pending is not None and not trainer.received_sigterm and _STATE.owner == os.getpid():
            signal.raise_signal(signal.SIGTERM)  # Lightning stops at the end of this step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:  # noqa: D102
        if not is_interrupt(exception) or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        if trainer.validating:  # stopped inside a validation: the last complete state is the saved one
            return
        last = self._last_callback(trainer)
        step = int(trainer.global_step)
        if last is None or step == self._start:
            return
        path = Path(last.dirpath) / "last.ckpt"
        if step != self._saved_step or not path.is_file():
            trainer.save_checkpoint(path, weights_only=False)
            for logger in trainer.loggers:  # the rows logged so far are backed by this checkpoint
                logger.after_save_checkpoint(last)
        _STATE.saved = (path, int(trainer.global_step), self.stage)
        log.info("saved step %d of %s to %s", trainer.global_step, self.stage, path)

    @staticmethod
    def _last_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.filename == "last" and callback.dirpath:
                return callback
        return None
