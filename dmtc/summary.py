"""Seed sweeps as the paper's table: runs that differ only in ``sid`` (and ``seed``) become one row.

``python train.py -m sid=0,1,2`` ends by writing ``summary.json``, ``summary.md``, ``summary.csv`` and
``summary.png`` (:func:`dmtc.plots.plot_summary`) in its sweep folder (:class:`SweepSummary`, a Hydra
callback); ``python -m dmtc.report DIR...`` builds the same from any run folders. Each row: the runs'
shared settings, ``n``, mean ± sample std (n − 1 in the denominator; 0 for one run) of the reported model's
final mIoU and, for DMT/DMTC, of the warm-up mIoU (the same model's), the gain, the final A, B and
ensemble, and per-class IoU; where the setting is published (:mod:`dmtc.published`) the published mIoU and
our mean's difference from it. Only finished runs (``results.json``) are averaged; unfinished run folders
are listed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dmtc.errors import DMTCError
from dmtc.files import RESULTS, atomic_write_text, write_json
from dmtc.published import SOURCE, published_miou

log = logging.getLogger(__name__)

#: overrides that tell repetitions of one setting apart (not part of a row's identity)
REPEAT_KEYS = ("sid", "seed")
#: overrides that never change what a run computes
IGNORED_KEYS = ("overwrite", "hydra.run.dir", "hydra.sweep.dir", "paths.log_dir", "paths.cache_dir", "paths.data_dir",
                "paths.weights_dir", "dataset.num_workers", "dataset.prefetch_factor", "logger")
SUMMARY_FILES = ("summary.json", "summary.md", "summary.csv")


@dataclass
class Run:
    """One run folder: its results (None while unfinished) and its setting (overrides without sid/seed)."""

    path: Path
    results: dict[str, Any] | None
    setting: tuple[str, ...] = field(default_factory=tuple)


def _overrides(run_dir: Path) -> list[str] | None:
    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        return [str(o) for o in OmegaConf.load(path)]
    except (OSError, ValueError):
        return None


def _setting(run_dir: Path, results: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The run's setting: its Hydra overrides minus ``sid``/``seed`` (and keys that change nothing), sorted;
    without a ``.hydra`` folder, the results' method, dataset, split and backbone."""
    overrides = _overrides(run_dir)
    if overrides is None:
        r = results or {}
        return tuple(f"{k}={r.get(k)}" for k in ("method", "dataset", "split", "backbone"))
    keep = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in REPEAT_KEYS or key in IGNORED_KEYS:
            continue
        keep.append(item)
    return tuple(sorted(keep))


def find_runs(dirs: Iterable[str | Path]) -> list[Run]:
    """Every run folder under ``dirs``: folders with a ``results.json`` (finished) or a ``.hydra`` folder but
    no results (unfinished), sorted by path; a folder inside another run (a phase) is not a run."""
    runs: dict[Path, Run] = {}
    for root in dirs:
        root = Path(root)
        candidates = {p.parent for p in root.rglob(RESULTS)} | {p.parent for p in root.rglob(".hydra")}
        if (root / RESULTS).is_file() or (root / ".hydra").is_dir():
            candidates.add(root)
        for run_dir in candidates:
            results = None
            try:
                results = json.loads((run_dir / RESULTS).read_text())
            except (OSError, ValueError):
                pass
            if results is not None and results.get("task") != "train":
                continue  # an evaluation or labeling folder
            runs[run_dir.resolve()] = Run(run_dir, results, _setting(run_dir, results))
    return [runs[k] for k in sorted(runs)]


def _stats(values: Sequence[float | None]) -> dict[str, Any] | None:
    """``{"mean", "std", "n"}`` of the values present (sample std; 0 for one value), or None for none."""
    present = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not present:
        return None
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": round(statistics.fmean(present), 4), "std": round(std, 4), "n": len(present)}


def _run_figures(results: Mapping[str, Any]) -> dict[str, float | None]:
    """The figures a row averages, from one run's results: the reported model's final (and, DMT/DMTC,
    warm-up) mIoU, the gain, and the final A, B and ensemble."""
    final = float(results["miou"])
    figures: dict[str, float | None] = {"miou": final}
    if "phases" in results:
        last = results["phases"][-1]["val"]
        warmup = results["warmup_miou"][results["model"]]
        figures.update({"warmup_miou": warmup, "gain": final - warmup, "a": last["a"]["miou"],
                        "b": last["b"]["miou"], "ensemble": results["ensemble_miou"]})
    return figures


def summarize_runs(runs: Sequence[Run]) -> dict[str, Any]:
    """Rows of the finished runs grouped by setting, and the unfinished run folders."""
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        if run.results is not None:
            groups.setdefault(run.setting, []).append(run)
    rows = []
    for setting, members in groups.items():
        first = members[0].results
        figures = [_run_figures(m.results) for m in members]
        names = list(first["per_class_iou"])
        row = {
            "setting": list(setting) or ["(defaults)"],
            "method": first["method"], "dataset": first["dataset"], "split": str(first["split"]),
            "backbone": first["backbone"], "n": len(members),
            "sids": sorted({int(m.results["sid"]) for m in members}),
            "seeds": sorted({int(m.results["seed"]) for m in members}),
            **{k: _stats([f.get(k) for f in figures]) for k in ("miou", "warmup_miou", "gain", "a", "b", "ensemble")},
            "per_class_iou": {c: _stats([m.results["per_class_iou"].get(c) for m in members]) for c in names},
            "runs": [str(m.path) for m in members],
        }
        published = published_miou(row["method"], row["dataset"], row["split"], row["backbone"])
        row["published"] = published
        row["vs_published"] = round(row["miou"]["mean"] - published, 4) if published is not None else None
        rows.append(row)
    rows.sort(key=lambda r: (r["dataset"], r["method"], r["split"], r["setting"]))
    shared = sorted(set.intersection(*(set(r["setting"]) for r in rows))) if rows else []
    for row in rows:  # what tells the rows apart
        row["label"] = " ".join(o for o in row["setting"] if o not in shared) or "(every run)"
    unfinished = [str(r.path) for r in runs if r.results is None]
    return {"shared_setting": shared, "rows": rows, "unfinished": unfinished, "published_source": SOURCE}


def _pm(stats: Mapping[str, Any] | None) -> str:
    return "-" if stats is None else f"{stats['mean']:.2f} ± {stats['std']:.2f}"


COLUMNS = ("setting", "n", "mIoU", "warm-up", "gain", "A", "B", "ensemble", "published", "Δ published")


def _cells(row: Mapping[str, Any]) -> list[str]:
    published = "-" if row["published"] is None else f"{row['published']:.2f}"
    delta = "-" if row["vs_published"] is None else f"{row['vs_published']:+.2f}"
    return [row["label"], str(row["n"]), _pm(row["miou"]), _pm(row["warmup_miou"]), _pm(row["gain"]),
            _pm(row["a"]), _pm(row["b"]), _pm(row["ensemble"]), published, delta]


def format_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown: one table of the rows (mean ± sample std over n runs), one per-class table
    per row, the unfinished runs."""
    shared = " ".join(summary["shared_setting"]) or "(none)"
    lines = ["# Sweep summary", "", "mean ± sample std over n finished runs (val mIoU, %); published: "
             f"{summary['published_source']}.", "", f"Overrides of every row: {shared}", "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in summary["rows"]]
    for row in summary["rows"]:
        lines += ["", f"## {row['label']}: per-class IoU (n = {row['n']}, sids {row['sids']})", "",
                  "| class | IoU |", "|---|---|"]
        lines += [f"| {name} | {_pm(stats)} |" for name, stats in row["per_class_iou"].items()]
    if summary["unfinished"]:
        lines += ["", "## Unfinished runs (not averaged)", ""] + [f"- {p}" for p in summary["unfinished"]]
    return "\n".join(lines) + "\n"


def format_csv(summary: Mapping[str, Any]) -> str:
    """One CSV line per row: setting, n, then mean and std columns of each figure and class, published."""
    figures = ("miou", "warmup_miou", "gain", "a", "b", "ensemble")
    classes = list(summary["rows"][0]["per_class_iou"]) if summary["rows"] else []
    header = ["setting", "method", "dataset", "split", "backbone", "n"]
    header += [f"{f}_{s}" for f in figures for s in ("mean", "std")]
    header += [f"iou/{c}_{s}" for c in classes for s in ("mean", "std")] + ["published", "vs_published"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for row in summary["rows"]:
        stats = [row[f] for f in figures] + [row["per_class_iou"].get(c) for c in classes]
        values = [v for s in stats for v in ((s["mean"], s["std"]) if s else ("", ""))]
        writer.writerow([" ".join(row["setting"]), row["method"], row["dataset"], row["split"], row["backbone"],
                         row["n"], *values, row["published"] if row["published"] is not None else "",
                         row["vs_published"] if row["vs_published"] is not None else ""])
    return out.getvalue()


def write_summary(directory: str | Path, summary: Mapping[str, Any]) -> list[Path]:
    """Write ``summary.json``, ``summary.md`` and ``summary.csv`` into ``directory`` (atomically)."""
    directory = Path(directory)
    paths = [write_json(directory / SUMMARY_FILES[0], summary)]
    paths.append(atomic_write_text(directory / SUMMARY_FILES[1], format_markdown(summary)))
    paths.append(atomic_write_text(directory / SUMMARY_FILES[2], format_csv(summary)))
    return paths


def summarize(dirs: Iterable[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Summarize the runs under ``dirs``; write the three files into ``out`` (default: the first dir)."""
    dirs = [Path(d) for d in dirs]
    runs = find_runs(dirs)
    if not runs:
        raise DMTCError(f"no run folder (results.json or .hydra/) under {', '.join(map(str, dirs))}: point it at "
                        "a sweep folder (outputs/train/multirun/<date>_<time>) or run folders")
    summary = summarize_runs(runs)
    out = Path(out or dirs[0])
    write_summary(out, summary)
    from dmtc.plots import plot_summary, save

    by_setting = {" ".join(r.setting) or "(defaults)": [] for r in runs if r.results is not None}
    for r in runs:
        if r.results is not None:
            by_setting[" ".join(r.setting) or "(defaults)"].append(r.results)
    save(plot_summary(summary, by_setting), out / "summary.png")
    return summary


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, :func:`summarize` its sweep folder (``hydra.sweep.dir``); when
    the runs logged to W&B, log the table there too (:func:`dmtc.dashboards.log_sweep_summary`)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: D102
        sweep_dir = Path(config.hydra.sweep.dir)
        if config.get("task_name") != "train" or not sweep_dir.is_dir() or not find_runs([sweep_dir]):
            return
        summary = summarize([sweep_dir])
        log.info("sweep summary of %d setting(s) written to %s/summary.{json,md,csv}", len(summary["rows"]), sweep_dir)
        print(format_markdown(summary).split("\n\n## ")[0])
        wandb_node = (config.get("logger") or {}).get("wandb")
        if wandb_node is not None:  # the runs logged to W&B: the table once, beside them (dmtc.dashboards)
            from dmtc.dashboards import log_sweep_summary

            log_sweep_summary(sweep_dir, summary, OmegaConf.to_container(wandb_node, resolve=False))
