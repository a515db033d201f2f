"""Ctrl-C, SIGINT and SIGTERM stop a run cleanly: the current step is saved, the rerun continues from it.

:func:`handle_interrupts` (around each entry point's task, :func:`dmtc.cli.run_entry`) installs handlers for
SIGINT and SIGTERM in the main process, and SIGUSR1 and SIGUSR2 inside a job whose scheduler requeues on one
of them (SLURM through submitit, ``hydra/launcher=slurm``: its handler, on USR2, is there before ours):

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
A requeue request (SLURM's signal before a time limit, or a preemption: submitit asks SLURM for USR2; USR1,
Lightning's and many clusters' convention, is taken the same way) stops the same way and then hands over to the
scheduler's own handler (:func:`requeue_handler`), which requeues the job: the requeued job reruns the same
command and continues from the saved step. With several processes (DDP) the request goes straight to the
scheduler's handler (the processes cannot agree on a step to stop at without a collective at every step), so
the requeued job continues from the last validation's ``last.ckpt``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
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
#: a job scheduler's "save and requeue" signals (taken only where a scheduler's handler is installed)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


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
    requeue: Callable[[], Any] | None = None  # calls the scheduler's requeue handler (submitit's) with its signal


_STATE = _State()


def signal_name(signum: int) -> str:
    """``SIGINT (Ctrl-C)``, ``SIGTERM`` or ``SIGUSR2 (SLURM: time limit or preemption)``."""
    name = signal.Signals(signum).name
    if signum in REQUEUE_SIGNALS:
        return f"{name} (SLURM: time limit or preemption)"
    return f"{name} (Ctrl-C)" if signum == signal.SIGINT else name


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _handler(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _STATE.owner:  # a forked worker (DataLoader, multiprocessing pool)
        if signum in REQUEUE_SIGNALS:  # SLURM signals every process of a job step: the main process requeues
            return
        if signum == signal.SIGINT:  # as without handlers (torch's worker loop ends on it)
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)  # SIGTERM: die, as without handlers (Pool.terminate sends it)
        os.kill(os.getpid(), signum)
        return
    if signum in REQUEUE_SIGNALS and _STATE.requeue is not None and _world_size() > 1:
        _STATE.requeue()  # DDP: the scheduler requeues from the last saved checkpoint
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
    requeue = _scheduler_requeue()
    handled = SIGNALS + (REQUEUE_SIGNALS if requeue is not None else ())
    previous = {s: signal.getsignal(s) for s in handled}
    saved_state = (_STATE.owner, _STATE.deferred, _STATE.pending, _STATE.saved, _STATE.requeue)
    _STATE.owner, _STATE.deferred, _STATE.pending, _STATE.saved = os.getpid(), 0, None, None
    _STATE.requeue = requeue
    for s in handled:
        signal.signal(s, _handler)
    _LIGHTNING_SIGNALS.addFilter(_QUIET)
    try:
        yield
    finally:
        _LIGHTNING_SIGNALS.removeFilter(_QUIET)
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _STATE.owner, _STATE.deferred, _STATE.pending, _STATE.saved, _STATE.requeue = saved_state


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


def _scheduler_requeue() -> Callable[[], Any] | None:
    """The requeue of the job scheduler that runs this process, if any: the handler installed on SIGUSR2 or
    SIGUSR1 before ours (submitit's ``checkpoint_and_try_requeue``), called with its own signal."""
    for signum in (signal.SIGUSR2, signal.SIGUSR1):
        handler = signal.getsignal(signum)
        if callable(handler):
            return lambda handler=handler, signum=signum: handler(signum, None)
    return None


def requeue_handler() -> Callable[[], Any] | None:
    """The job scheduler's requeue found when the handlers were installed (submitit's: requeue the job, then
    exit), if any."""
    return _STATE.requeue


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
