"""What a finished training run reports: ``results.json`` and the table printed at its end.

One builder per method family shares the fields every run has (:func:`run_fields`) and the per-class table
of the reported model (:func:`results_table`); supervised training is DMT's warm-up of one model with no
phases (:func:`supervised_results`), DMT/DMTC add the pair and one entry per phase
(:mod:`dmtc.dmt.results`). :func:`write_results` is the one place results are written (rank 0,
atomically) and printed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dmtc.data.split_resolver import Split
from dmtc.errors import DMTCError
from dmtc.files import RESULTS, is_rank_zero, write_json

log = logging.getLogger(__name__)



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


def format_table(title: str, per_class_iou: Mapping[str, float | None], miou: float) -> str:
    """A plain-text table of per-class IoU and mIoU (absent classes shown as '-')."""
    width = max([len(n) for n in per_class_iou] + [4])
    lines = [title, "-" * (width + 10)]
    for name, iou in per_class_iou.items():
        lines.append(f"{name:<{width}}  {'-' if iou is None else f'{iou:6.2f}':>6}")
    lines.append("-" * (width + 10))
    lines.append(f"{'mIoU':<{width}}  {miou:6.2f}")
    return "\n".join(lines)


def results_table(results: Mapping[str, Any]) -> str:
    """Per-class IoU and mIoU of the model a run reports (``results["model"]`` when there are several)."""
    model = f" model {results['model'].upper()}" if "model" in results else ""
    title = f"{results['dataset']} split={results['split']} sid={results['sid']}{model}: val IoU (%)"
    return format_table(title, results["per_class_iou"], results["miou"])


def write_results(run_dir: Path, results: Mapping[str, Any], table: str) -> None:
    """Write ``<run_dir>/results.json`` and print ``table`` (rank 0 only; the run is then finished)."""
    if not is_rank_zero():
        return
    path = write_json(Path(run_dir) / RESULTS, results)
    print(table)
    log.info("results written to %s", path)


def main(argv: list[str] | None = None) -> int:
    """``python -m dmtc.report DIR... [--out OUT]``: the sweep summary (:mod:`dmtc.summary`) of every run
    folder under the DIRs, written to OUT (default: the first DIR) and printed."""
    import argparse

    from dmtc.summary import format_markdown, summarize

    parser = argparse.ArgumentParser(
        prog="python -m dmtc.report",
        description="Summarize run folders as the paper's table: one row per setting (runs differing only in "
                    "sid/seed), mean ± sample std, published numbers beside; writes summary.{json,md,csv,png}.")
    parser.add_argument("dirs", nargs="+", type=Path, help="run folders, or folders holding them (a sweep folder)")
    parser.add_argument("--out", type=Path, default=None, help="where summary.{json,md,csv} go (default: first DIR)")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.dirs, args.out)
    except DMTCError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
