"""What a finished training run reports: ``results.json`` and the table printed at its end.

One builder per method family shares the fields every run has (:func:`run_fields`); supervised training
is DMT's warm-up of one model with no phases (:func:`supervised_results`), DMT/DMTC add the pair and
one entry per phase (:func:`dmt_results`). :func:`write_results` is the one place results are written
(rank 0, atomically) and printed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from dmtc.data.split_resolver import Split
from dmtc.files import is_rank_zero, write_json
from dmtc.module import ENSEMBLE

if TYPE_CHECKING:  # the protocol imports this module
    from dmtc.dmt.phases import PhaseRecord
    from dmtc.dmt.protocol import Run

log = logging.getLogger(__name__)

RESULTS = "results.json"


def run_fields(cfg: DictConfig, split: Split) -> dict[str, Any]:
    """The fields of every run: task, method, dataset, split (its name: ``8``, ``106-l``, ``train+unlabeled``),
    sid, seed and backbone."""
    return {"task": "train", "method": str(cfg.method.name), "dataset": cfg.dataset.name, "split": split.name,
            "sid": int(cfg.sid), "seed": int(cfg.seed), "backbone": cfg.backbone.name}


def supervised_results(cfg: DictConfig, split: Split, summary: Mapping[str, Any], checkpoint: str | None,
                       steps: int, wall: float) -> dict[str, Any]:
    """Results of a supervised run: the re-validated best checkpoint's ``summary`` (mIoU, per-class IoU)."""
    output_dir = Path(cfg.paths.output_dir)
    return {
        **run_fields(cfg, split),
        "miou": summary["miou"],
        "per_class_iou": summary["per_class_iou"],
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
        "num_labeled": len(split.labeled),
        "num_val": len(split.val),
        "steps": int(steps),
        "wall_time_s": round(wall, 1),
        "output_dir": str(output_dir.resolve()),
    }


def dmt_results(cfg: DictConfig, run: Run, records: Sequence[PhaseRecord], wall: float) -> dict[str, Any]:
    """Results of a DMT/DMTC run: the final phase's better model (A or B) is the run's model; every phase
    with its re-validated A, B and ensemble, pseudo-label summaries and checkpoints."""
    run_dir, pair, final = run.run_dir, run.pair, records[-1]
    keys = ("a", "b")
    key = max(keys, key=final.miou)
    checkpoints = {k: str(final.checkpoint(run_dir, k).resolve()) for k in keys}
    phases = [{
        "phase": rec.phase, "name": rec.name, "ratio": rec.ratio, "steps": rec.steps, "val": rec.val,
        "pseudo": rec.pseudo, "checkpoints": {k: str(rec.checkpoint(run_dir, k).resolve()) for k in keys},
        "wall_time_s": rec.wall_time_s,
    } for rec in records]
    return {
        **run_fields(cfg, run.split),
        "pair_init": pair.mode,
        "pair": {"inits": dict(pair.inits), "seeds": dict(pair.seeds), "warmup_lists": pair.warmup,
                 "warmup_labeled": {k: len(v) for k, v in run.warmup.items()} if run.warmup else None,
                 "stacked_inputs": run.stacked},
        "ratios": [float(r) for r in cfg.method.ratios],
        "model": key,
        "miou": final.val[key]["miou"],
        "per_class_iou": final.val[key]["per_class_iou"],
        "checkpoint": checkpoints[key],
        "checkpoints": checkpoints,
        "ensemble_miou": final.val[ENSEMBLE]["miou"],
        "warmup_miou": {k: records[0].val[k]["miou"] for k in (*keys, ENSEMBLE)},
        "phases": phases,
        "num_labeled": len(run.split.labeled),
        "num_unlabeled": len(run.split.unlabeled),
        "num_val": len(run.split.val),
        "steps": final.step_end,
        "wall_time_s": round(sum(r.wall_time_s for r in records), 1),
        "this_run_wall_time_s": round(wall, 1),
        "output_dir": str(run_dir.resolve()),
    }


def format_table(title: str, per_class_iou: Mapping[str, float | None], miou: float) -> str:
    """A plain-text table of per-class IoU and mIoU (absent classes shown as '-')."""
    width = max([len(n) for n in per_class_iou] + [4])
    lines = [title, "-" * (width + 10)]
    for name, iou in per_class_iou.items():
        lines.append(f"{name:<{width}}  {'-' if iou is None else f'{iou:6.2f}':>6}")
    lines.append("-" * (width + 10))
    lines.append(f"{'mIoU':<{width}}  {miou:6.2f}")
    return "\n".join(lines)


def format_dmt_table(results: Mapping[str, Any]) -> str:
    """Per-phase mIoU of A, B and their ensemble, then warm-up vs final."""
    head = f"{'phase':<16}{'ratio':>6}{'A':>8}{'B':>8}{'A+B':>8}"
    title = f"{results['method'].upper()} {results['dataset']} split={results['split']} sid={results['sid']}"
    lines = [f"{title}: val mIoU (%)", head, "-" * len(head)]
    for ph in results["phases"]:
        v = ph["val"]
        ratio = "-" if ph["ratio"] is None else f"{ph['ratio']:g}"
        lines.append(f"{ph['name']:<16}{ratio:>6}{v['a']['miou']:8.2f}{v['b']['miou']:8.2f}{v[ENSEMBLE]['miou']:8.2f}")
    lines.append("-" * len(head))
    w, f = results["phases"][0]["val"], results["phases"][-1]["val"]
    for label, k in (("A", "a"), ("B", "b"), ("ensemble", ENSEMBLE)):
        lines.append(f"{label:<9} warm-up {w[k]['miou']:6.2f} → final {f[k]['miou']:6.2f} "
                     f"({f[k]['miou'] - w[k]['miou']:+.2f})")
    lines.append(f"best model: {results['model'].upper()} ({results['miou']:.2f}) {results['checkpoint']}")
    return "\n".join(lines)


def format_results(results: Mapping[str, Any]) -> str:
    """The end-of-run table: per-class IoU of the reported model, then (DMT/DMTC) the phases."""
    model = f" model {results['model'].upper()}" if "model" in results else ""
    title = f"{results['dataset']} split={results['split']} sid={results['sid']}{model}: val IoU (%)"
    table = format_table(title, results["per_class_iou"], results["miou"])
    return f"{table}\n\n{format_dmt_table(results)}" if "phases" in results else table


def write_results(run_dir: Path, results: Mapping[str, Any]) -> None:
    """Write ``<run_dir>/results.json`` and print the table (rank 0 only; the run is then finished)."""
    if not is_rank_zero():
        return
    path = write_json(Path(run_dir) / RESULTS, results)
    print(format_results(results))
    log.info("results written to %s", path)
