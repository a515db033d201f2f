"""Lightning callbacks that record what a real run did, for tests: instantiated from the config like any
callback (``+callbacks.probe._target_=probes.TrainerProbe``), in-process or in train.py subprocesses (with
``tests/`` on ``PYTHONPATH`` and ``+callbacks.probe.out=DIR``: one JSON per rank and fit)."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import lightning as L

#: one record per ``fit`` of this process, in order (in-process tests read it; clear it first)
RECORDS: list[dict[str, Any]] = []
#: fits recorded so far per output folder, in this process (one probe instance per Trainer: DMT builds one per stage)
FITS: collections.Counter[Path] = collections.Counter()


def _device_batches(loader: Any) -> dict[str, int]:
    """Batch size of every DataLoader in a (possibly combined, nested) training loader, by its path."""
    from lightning.pytorch.utilities import CombinedLoader
    from torch.utils.data import DataLoader

    if isinstance(loader, CombinedLoader):
        loader = loader.iterables
    if isinstance(loader, DataLoader):
        return {"": int(loader.batch_size)}
    if isinstance(loader, dict):
        return {f"{k}/{p}".rstrip("/"): v for k, sub in loader.items() for p, v in _device_batches(sub).items()}
    return {}


class TrainerProbe(L.Callback):
    """At each ``fit`` start: the stage, the Trainer's precision, world size and rank, the DMTC weight, the
    batches per epoch, the optimizer steps of the fit, the per-device batch size of every training loader and
    (in-process only) a copy of every model's weights."""

    def __init__(self, out: str | None = None) -> None:
        self.out = Path(out) if out else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        contrastive = getattr(pl_module, "contrastive", None)
        record = {
            "stage": getattr(pl_module, "stage", "supervised"),
            "precision": str(trainer.precision),
            "world_size": int(trainer.world_size),
            "global_rank": int(trainer.global_rank),
            "contrastive_weight": None if contrastive is None else float(contrastive.weight),
            "global_step": int(trainer.global_step),
            "num_training_batches": int(trainer.num_training_batches),
            "estimated_stepping_batches": int(trainer.estimated_stepping_batches),
            "device_batches": _device_batches(trainer.train_dataloader),
        }
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            path = self.out / f"rank{trainer.global_rank}_fit{FITS[self.out]}.json"
            path.write_text(json.dumps(record))
            FITS[self.out] += 1
        record["weights"] = {k: {n: t.detach().cpu().clone() for n, t in m.state_dict().items()}
                             for k, m in pl_module.models.items()}
        RECORDS.append(record)


class PauseAtStep(L.Callback):
    """Hold a training process at a known step until a signal asks it to stop, so that a test can deliver the
    signal mid-phase: at step ``step`` of a ``stage`` fit (``mutual``: a DMT phase), once per ``marker`` file
    (not again after a restart), write ``marker`` and wait for a pending stop (:func:`dmtc.interrupts.pending`),
    at most ``timeout`` seconds."""

    def __init__(self, marker: str, step: int, stage: str = "mutual", timeout: float = 120.0) -> None:
        self.marker, self.step, self.stage, self.timeout = Path(marker), int(step), stage, float(timeout)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:  # noqa: D102
        import time

        from dmtc import interrupts

        if getattr(pl_module, "stage", None) != self.stage or trainer.global_step != self.step:
            return
        if self.marker.exists():
            return
        self.marker.write_text(str(self.step))
        deadline = time.monotonic() + self.timeout
        while interrupts.pending() is None and time.monotonic() < deadline:
            time.sleep(0.05)


class CompileProbe(L.Callback):
    """Whether each forward pass of the models ran compiled: a forward hook on every model's classifier records
    ``torch.compiler.is_compiling()`` (True inside a torch.compile'd forward, where the hook is traced and its
    append replayed at every call; False in eager mode), under ``"train"`` or ``"val"`` by the module's mode.
    One record per fit in :data:`RECORDS`."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        import torch

        record: dict[str, list[bool]] = {"train": [], "val": []}

        def hook(module: Any, inputs: Any, output: Any) -> None:
            record["train" if module.training else "val"].append(torch.compiler.is_compiling())

        for model in pl_module.models.values():
            model.classifier.register_forward_hook(hook)
        RECORDS.append(record)
