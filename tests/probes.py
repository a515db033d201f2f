"""Lightning callbacks that record what a real run did, for tests: instantiated from the config like any
callback (``+callbacks.probe._target_=probes.TrainerProbe``), in-process or in train.py subprocesses (with
``tests/`` on ``PYTHONPATH`` and ``+callbacks.probe.out=DIR``: one JSON per rank and fit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

#: one record per ``fit`` of this process, in order (in-process tests read it; clear it first)
RECORDS: list[dict[str, Any]] = []


class TrainerProbe(L.Callback):
    """At each ``fit`` start: the stage, the Trainer's precision, world size and rank, the DMTC weight, the
    per-device batch size and (in-process only) a copy of every model's weights."""

    def __init__(self, out: str | None = None) -> None:
        self.out = Path(out) if out else None
        self.fits = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        contrastive = getattr(pl_module, "contrastive", None)
        record = {
            "stage": getattr(pl_module, "stage", "supervised"),
            "precision": str(trainer.precision),
            "world_size": int(trainer.world_size),
            "global_rank": int(trainer.global_rank),
            "contrastive_weight": None if contrastive is None else float(contrastive.weight),
            "global_step": int(trainer.global_step),
        }
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            path = self.out / f"rank{trainer.global_rank}_fit{self.fits}.json"
            path.write_text(json.dumps(record))
        record["weights"] = {k: {n: t.detach().cpu().clone() for n, t in m.state_dict().items()}
                             for k, m in pl_module.models.items()}
        RECORDS.append(record)
        self.fits += 1
