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
    if "phases" in results and is_rank_zero():
        from dmtc.plots import plot_run, save

        save(plot_run(results), run_dir / "report.png")
    return results
