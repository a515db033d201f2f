"""What a DMT/DMTC run reports (Feng et al., Pattern Recognition 2022, Tables 2–4: A, B and their ensemble
per phase): the ``results.json`` fields beyond :func:`dmtc.report.run_fields`, and the phase table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dmtc.data.split_resolver import Split
from dmtc.dmt.pair import PAIR, PairSpec
from dmtc.dmt.phases import PhaseRecord
from dmtc.module import ENSEMBLE
from dmtc.report import results_table, run_fields


def dmt_results(cfg: DictConfig, split: Split, pair: PairSpec, warmup: Mapping[str, Sequence[str]] | None,
                stacked: bool, records: Sequence[PhaseRecord], wall: float) -> dict[str, Any]:
    """Results of a DMT/DMTC run: the final phase's better model (A or B) is the run's model; every phase
    with its re-validated A, B and ensemble, pseudo-label summaries and checkpoints. ``warmup``: each
    model's warm-up list (``pair_init=subsets``); ``stacked``: whether batches carry one input per model."""
    run_dir, final, keys = Path(cfg.paths.output_dir), records[-1], PAIR
    key = max(keys, key=final.miou)
    checkpoints = {k: str(final.checkpoint(run_dir, k).resolve()) for k in keys}
    phases = [{
        "phase": rec.phase, "name": rec.name, "ratio": rec.ratio, "steps": rec.steps, "val": rec.val,
        "pseudo": rec.pseudo, "checkpoints": {k: str(rec.checkpoint(run_dir, k).resolve()) for k in keys},
        "wall_time_s": rec.wall_time_s,
    } for rec in records]
    return {
        **run_fields(cfg, split),
        "pair_init": pair.mode,
        "pair": {"inits": dict(pair.inits), "seeds": dict(pair.seeds), "warmup_lists": pair.warmup,
                 "warmup_labeled": {k: len(v) for k, v in warmup.items()} if warmup else None,
                 "stacked_inputs": stacked},
        "ratios": [float(r) for r in cfg.method.ratios],
        "model": key,
        "miou": final.val[key]["miou"],
        "per_class_iou": final.val[key]["per_class_iou"],
        "checkpoint": checkpoints[key],
        "checkpoints": checkpoints,
        "ensemble_miou": final.val[ENSEMBLE]["miou"],
        "warmup_miou": {k: records[0].val[k]["miou"] for k in (*keys, ENSEMBLE)},
        "reported_phase": final.name,
        "best_phase": best_phase(records),
        "phases": phases,
        "num_labeled": len(split.labeled),
        "num_unlabeled": len(split.unlabeled),
        "num_val": len(split.val),
        "steps": final.step_end,
        "wall_time_s": round(sum(r.wall_time_s for r in records), 1),
        "this_run_wall_time_s": round(wall, 1),
        "output_dir": str(run_dir.resolve()),
    }


def best_phase(records: Sequence[PhaseRecord]) -> dict[str, Any]:
    """The phase whose re-validated A or B scored highest (``{"name", "model", "miou"}``): the run reports
    the final phase's model, as DMT does; this says whether an earlier phase was better."""
    name, key, miou = max(((r.name, k, r.miou(k)) for r in records for k in PAIR), key=lambda t: t[2])
    return {"name": name, "model": key, "miou": miou}


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
    lines.append(f"reported: model {results['model'].upper()} of the final phase {results['phases'][-1]['name']} "
                 f"({results['miou']:.2f}) {results['checkpoint']}")
    best = results.get("best_phase")
    if best:
        lines.append(f"best phase: {best['name']} (model {best['model'].upper()}, {best['miou']:.2f})")
    return "\n".join(lines)


def dmt_table(results: Mapping[str, Any]) -> str:
    """The end-of-run table of a DMT/DMTC run: the reported model's per-class IoU, then the phases."""
    return f"{results_table(results)}\n\n{format_dmt_table(results)}"
