"""The steps of DMT's protocol and what a finished one leaves behind (Feng et al., Pattern Recognition
2022, Algorithm 1).

Phase 0 is the warm-up; phases 1..K have label ratios r_k (``method.ratios``). Each lives in a sub-folder of
the run dir (``phase0_warmup/``, ``phase1_r0.2/``, …) holding ``checkpoints/`` (the best-by-val checkpoint
of each model, weights only, and ``last.ckpt`` to resume from), ``pseudo_a/``, ``pseudo_b/`` and
``done.json`` (a :class:`PhaseRecord`), written atomically once the phase is finished and validated: a phase
with a consistent ``done.json`` is never run again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig
from torch import nn

from dmtc.callbacks import last_checkpoint_callback
from dmtc.checkpoint_io import checkpoint_problem
from dmtc.dmt.pair import PAIR
from dmtc.errors import DMTCError
from dmtc.files import read_json, write_json

log = logging.getLogger(__name__)

DONE = "done.json"


@dataclass(frozen=True)
class Phase:
    """One step of the protocol: index (0 = warm-up), label ratio (None for warm-up), folder name."""

    index: int
    ratio: float | None

    @property
    def name(self) -> str:
        return "phase0_warmup" if self.ratio is None else f"phase{self.index}_r{self.ratio:g}"

    @property
    def warmup(self) -> bool:
        """Whether this is phase 0 (supervised warm-up of the pair, no pseudo labels)."""
        return self.ratio is None


def phases_of(cfg: DictConfig) -> list[Phase]:
    """Warm-up then one phase per ratio of ``method.ratios`` (each in (0, 1])."""
    ratios = [float(r) for r in cfg.method.ratios]
    bad = [r for r in ratios if not 0.0 < r <= 1.0]
    if bad:
        raise DMTCError(f"method.ratios must lie in (0, 1]; got {bad}")
    return [Phase(0, None)] + [Phase(i + 1, r) for i, r in enumerate(ratios)]


@dataclass(frozen=True)
class PhaseRecord:
    """A finished phase (``done.json``): its steps on the run's continuous step axis, each model's best
    checkpoint (relative to the run dir), the re-validation of those checkpoints (``val[key]`` for ``a``,
    ``b`` and the ensemble ``ens``: ``miou``, ``per_class_iou``), the pseudo-label summary of each model
    (None for the warm-up) and the phase's wall time."""

    phase: int
    name: str
    ratio: float | None
    steps: int
    step_start: int
    step_end: int
    checkpoints: dict[str, str]
    val: dict[str, dict[str, Any]]
    pseudo: dict[str, Any] | None
    wall_time_s: float

    def checkpoint(self, run_dir: Path, key: str) -> Path:
        """Model ``key``'s best checkpoint of this phase."""
        return run_dir / self.checkpoints[key]

    def miou(self, key: str) -> float:
        """Re-validated mIoU of model ``key`` (``a``, ``b`` or ``ens``)."""
        return float(self.val[key]["miou"])


def read_done(run_dir: Path, phase: Phase) -> PhaseRecord | None:
    """The phase's record if it is complete and consistent (its checkpoints exist and can be read), else None
    (with a warning saying why, when a record exists)."""
    path = run_dir / phase.name / DONE
    data = read_json(path)
    if data is None:
        return None
    try:
        record = PhaseRecord(**data)
        ok = (record.phase == phase.index and record.ratio == phase.ratio
              and all(record.checkpoint(run_dir, k).is_file() for k in PAIR))
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        log.warning("ignoring inconsistent %s: the phase will be (re)run", path)
        return None
    for key in PAIR:
        problem = checkpoint_problem(record.checkpoint(run_dir, key))
        if problem is not None:
            log.warning("ignoring %s: its checkpoint %s is unreadable (%s; truncated or damaged): the phase will "
                        "be rerun", path, record.checkpoint(run_dir, key), problem)
            return None
    return record


def write_done(run_dir: Path, record: PhaseRecord) -> Path:
    """Write the phase's ``done.json`` (atomically: the phase counts as finished once it exists)."""
    return write_json(run_dir / record.name / DONE, asdict(record), durable=True)


def relative(path: str | Path, root: Path) -> str:
    """``path`` relative to ``root`` (records stay valid when the run folder moves)."""
    return os.path.relpath(Path(path).resolve(), root.resolve())


def checkpoint_callbacks(phase_dir: Path) -> dict[str, ModelCheckpoint]:
    """Best-by-val checkpoint per model (monitor ``val/<key>/miou``) and ``"last"`` (every validation)."""
    callbacks = {
        key: ModelCheckpoint(
            dirpath=phase_dir / "checkpoints",
            filename=f"best-{key}-step{{step}}-miou{{val/{key}/miou:.2f}}",
            auto_insert_metric_name=False,
            monitor=f"val/{key}/miou",
            mode="max",
            save_top_k=1,
            save_weights_only=True,  # read by evaluation and the next phase; resuming uses last.ckpt
        )
        for key in PAIR
    }
    callbacks["last"] = last_checkpoint_callback(phase_dir / "checkpoints")
    return callbacks


def load_phase_weights(model: nn.Module, path: str | Path, key: str) -> None:
    """Load model ``key``'s weights from one of a phase's Lightning checkpoints (``state_dict`` entries
    ``models.<key>.*``) into ``model``, strictly: every tensor of the model must be there. An unreadable
    file is one :class:`DMTCError` naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    except Exception as err:  # any failure to read means the file is unusable
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise DMTCError(f"checkpoint {path} cannot be read ({reason}): it is truncated or damaged; delete the "
                        "phase's done.json to train that phase again") from err
    prefix = f"models.{key}."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise DMTCError(f"{path} holds no weights of model {key} (state_dict keys {prefix}*)")
    model.load_state_dict(weights, strict=True)
