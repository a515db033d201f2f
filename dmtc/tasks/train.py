"""``python train.py [dataset=...] [split=8] [sid=0] [method=dmtc|dmt|supervised] [key=value ...]``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dmtc.errors import DMTCError
from dmtc.files import is_rank_zero
from dmtc.report import RESULTS, results_table, write_results

log = logging.getLogger(__name__)

METHODS = ("supervised", "dmt", "dmtc")


def wandb_summary(results: dict[str, Any]) -> None:
    """Put the run's outcome in its W&B run summary (when a W&B run is open): final mIoU, warm-up mIoU and
    gain (DMT/DMTC: of the reported model), ensemble mIoU, reported and best phase, best checkpoint path;
    then finish the W&B run (the training is over; the next job of a multirun starts its own)."""
    import sys

    wandb = sys.modules.get("wandb")  # only when a WandbLogger brought it in
    if wandb is None or wandb.run is None or not is_rank_zero():
        return
    summary = {"final/miou": results["miou"], "final/checkpoint": results.get("checkpoint")}
    if "phases" in results:
        warmup = results["warmup_miou"][results["model"]]
        summary.update({"final/model": results["model"], "final/warmup_miou": warmup,
                        "final/gain": results["miou"] - warmup, "final/ensemble_miou": results["ensemble_miou"],
                        "final/reported_phase": results["reported_phase"],
                        "final/best_phase": results["best_phase"]["name"]})
    wandb.run.summary.update(summary)
    wandb.finish()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured method (``method.name``): ``supervised`` (:mod:`dmtc.supervised`), ``dmt`` or
    ``dmtc`` (DMT plus the contrastive term, :mod:`dmtc.dmt.protocol`); write ``results.json`` and return it.

    A run folder that already holds ``results.json`` is finished: its results are returned without
    training (``overwrite=true`` retrains)."""
    run_dir = Path(cfg.paths.output_dir)
    results_path = run_dir / RESULTS
    if results_path.is_file() and not cfg.get("overwrite", False):
        log.info("%s exists: this run is finished (pass overwrite=true or another run dir to retrain)", results_path)
        return json.loads(results_path.read_text())
    method = str(cfg.method.name)
    if method not in METHODS:
        raise DMTCError(f"method={method!r} is not implemented; choose {', '.join(METHODS)}")
    if method == "supervised":
        from dmtc.supervised import run_supervised

        results = run_supervised(cfg)
        table = results_table(results)
    else:
        from dmtc.dmt.protocol import run_dmt
        from dmtc.dmt.results import dmt_table

        results = run_dmt(cfg)
        table = dmt_table(results)
    write_results(run_dir, results, table)
    wandb_summary(results)
    if "phases" in results and is_rank_zero():
        from dmtc.plots import plot_run, save

        save(plot_run(results), run_dir / "report.png")
    return results
