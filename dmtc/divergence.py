"""A diverging run stops at once, with one message, and keeps its last good checkpoint.

:class:`DivergenceGuard` (a callback of every training Trainer, ``callbacks.divergence``) watches the loss
before each backward and, without a ``GradScaler``, each model's gradient norm before each optimizer step.
The first non-finite value ends training with :class:`DivergenceError`: which stage, model and step, the
last good checkpoint, what to try. No checkpoint is written after it (the check runs before every
checkpoint save and every validation), so a rerun with a lower learning rate continues from the last good
state, and no ``results.json`` claims a success.

Under ``precision=16-mixed`` a ``GradScaler`` skips steps whose gradients overflow fp16 and lowers its scale:
those are not divergence, so gradients are not checked there (the loss still is).

The flags stay on the device: the host reads them every ``check_every_n_steps`` steps (default: the
Trainer's ``log_every_n_steps``, when the logged losses are read anyway), before every checkpoint save and
validation, and at the end of training; on a CPU, where reading is free, after every step. The step of
the first non-finite value is recorded on the device, so the message names it exactly either way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from dmtc.errors import DMTCError
from dmtc.progress import StageProgress

__all__ = ["DivergenceError", "DivergenceGuard"]


class DivergenceError(DMTCError):
    """Training produced a non-finite loss or gradient norm (the message says where and what to try)."""


def grad_norm(module: nn.Module) -> torch.Tensor:
    """The L2 norm of all of ``module``'s gradients (0 when it has none), on their device, no host sync."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in module.parameters() if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


class DivergenceGuard(StageProgress, Callback):
    """Ends training at the first non-finite loss or gradient norm with one :class:`DivergenceError`.

    :func:`dmtc.trainer.build_trainer` sets :attr:`stage` (how the message names the stage), :attr:`lr_key`
    (the config key of this stage's learning rate) and :attr:`run_dir` (for the rerun hint).
    """

    def __init__(self, check_every_n_steps: int | None = None) -> None:
        super().__init__()
        self.check_every_n_steps = check_every_n_steps
        self.lr_key = "optim.lr"
        self.run_dir: str | None = None
        self._first: torch.Tensor | None = None  # step of the first non-finite value, -1 while none
        self._what: torch.Tensor | None = None  # per model: 1 loss, 2 gradient norm (first bad step)
        self._loss_bad: torch.Tensor | None = None
        self._good: tuple[str | None, int] = (None, 0)  # last good checkpoint of this fit and its step

    # -- recording (device only) -------------------------------------------------------------------------
    def _models(self, pl_module: L.LightningModule) -> dict[str, nn.Module]:
        models = getattr(pl_module, "models", None)
        return dict(models.items()) if isinstance(models, nn.ModuleDict) else {"model": pl_module}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        device = pl_module.device
        self._first = torch.full((), -1, dtype=torch.int64, device=device)
        self._what = torch.zeros(len(self._models(pl_module)), dtype=torch.int64, device=device)
        self._loss_bad = None
        self._good = (str(trainer.ckpt_path) if trainer.ckpt_path else None, int(trainer.global_step))

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:  # noqa: D102
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:  # noqa: D102
        if self._first is None or self._what is None:
            return
        models = self._models(pl_module)
        device = self._first.device
        what = torch.zeros(len(models), dtype=torch.int64, device=device)
        if trainer.precision != "16-mixed":  # with a GradScaler an overflow is a skipped step, not divergence
            norms = torch.stack([grad_norm(m).to(device) for m in models.values()])
            what = torch.where(torch.isfinite(norms), what, torch.full_like(what, 2))
        if self._loss_bad is not None:  # the summed loss: blame the models whose gradients went bad with it
            loss_bad = self._loss_bad.to(device)
            blamed = torch.where((what > 0).any(), (what > 0).long(), torch.ones_like(what))
            what = torch.where(loss_bad, blamed, what)
        bad = (what > 0).any()
        first_now = bad & (self._first < 0)
        self._what = torch.where(first_now, what, self._what)
        self._first = torch.where(first_now, torch.full_like(self._first, trainer.global_step + 1), self._first)
        self._loss_bad = None
        every = self.check_every_n_steps or trainer.log_every_n_steps or 1
        if device.type == "cpu" or (trainer.global_step + 1) % max(1, int(every)) == 0:
            self.check(trainer, pl_module)

    # -- checking (one host read) --------------------------------------------------------------------------
    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Raise :class:`DivergenceError` if a non-finite loss or gradient norm was seen in this fit."""
        if self._first is None or self._what is None:
            return
        first = int(self._first.item())
        if first < 0:
            return
        raise DivergenceError(self.message(trainer, pl_module, first, self._what.tolist()))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
                           ) -> None:  # noqa: D102
        self.check(trainer, pl_module)  # never write a diverged state over the last good one
        self._good = (None, int(trainer.global_step))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self.check(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self.check(trainer, pl_module)

    # -- the message -------------------------------------------------------------------------------------
    def _last_good(self, trainer: L.Trainer) -> tuple[Path | None, int]:
        """The resumable checkpoint of this stage (``last.ckpt`` of the last-checkpoint callback) and its step."""
        path, step = self._good
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.filename == "last" and callback.dirpath:
                last = Path(callback.dirpath) / "last.ckpt"
                if last.is_file():
                    return last, step
        return (Path(path), step) if path else (None, 0)

    def message(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, what: list[int]) -> str:
        """One line: where the run diverged, its last good checkpoint and what to try."""
        keys = list(self._models(pl_module))
        kind = "loss" if any(w == 1 for w in what) else "gradient norm"
        flagged = [k for k, w in zip(keys, what) if w]
        if kind == "loss" and len(flagged) > 1:  # the logged per-model losses say which one (read once, here)
            losses = {k: trainer.callback_metrics.get(f"train/{k}/loss") for k in flagged}
            own = [k for k, v in losses.items() if isinstance(v, torch.Tensor) and not torch.isfinite(v).all()]
            flagged = own or flagged
        named = [k.upper() if len(k) == 1 else k for k in flagged]
        if not isinstance(getattr(pl_module, "models", None), nn.ModuleDict):
            who = "the model"
        else:
            who = f"{'models' if len(named) > 1 else 'model'} {' and '.join(named)}"
        last, good_step = self._last_good(trainer)
        if last is not None:
            where = (f"the last good checkpoint is {last} (step {good_step}); rerunning continues from it "
                     f"(nothing after step {good_step} was saved)")
        else:
            where = "no checkpoint of this stage was saved yet: rerunning starts it again from its beginning"
        lr = getattr(pl_module, "lr", None)
        tries = [f"a lower learning rate ({self.lr_key}={_lower(lr)}, a tenth of {_number(lr)})"
                 if isinstance(lr, float) else f"a lower {self.lr_key}"]
        if trainer.precision != "32-true":
            tries.append(f"full precision (precision=32-true instead of {trainer.precision})")
        folder = (f" plus hydra.run.dir={self.run_dir} (else the changed setting names a new run folder)"
                  if self.run_dir else "")
        return (f"training diverged in {self.stage}: the {kind} of {who} is not finite (NaN or inf) "
                f"at step {step}; {where}. Try {' or '.join(tries)}: rerun the command with that change{folder}")


def _number(value: float) -> str:
    """``0.004``, ``1e8`` (as one would type it on the command line)."""
    return f"{value:g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _lower(lr: float) -> str:
    """A learning rate ten times lower, rounded to one significant digit (``0.04`` → ``0.004``)."""
    if not lr > 0 or not math.isfinite(lr):
        return "..."
    return _number(float(f"{lr / 10:.1g}"))
