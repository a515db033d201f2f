"""Plots of what a DMT/DMTC run and a seed sweep did (PNG, matplotlib's Agg backend: no display needed).

* ``report.png`` (one run, :func:`plot_run`): val mIoU of A, B and their ensemble per phase; per label
  ratio r the fraction of pixels the curriculum keeps and, where the unlabeled images have ground truth,
  the kept labels' precision (mean over classes); per-class IoU of the reported model after the warm-up and
  at the end.
* ``summary.png`` (one sweep, :func:`plot_summary`): the same curves as mean ± sample std bands over the
  runs of each setting, and a bar chart of each setting's final mIoU (mean ± std) beside the published
  number where there is one (:mod:`dmtc.published`).

Each function returns the figure (its axes hold the plotted data: tests read them) and writes it with
:func:`save`.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dmtc.files import atomic_write_bytes  # noqa: E402

MODELS = (("a", "A"), ("b", "B"), ("ens", "A+B ensemble"))


def phase_curves(results: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`plot_run` draws, from one run's results: phase labels, mIoU per model and phase, and per
    ratio the kept fraction (%) and mean kept-label precision (%, None without ground truth) of A and B."""
    phases = results["phases"]
    labels = [p["name"].split("_", 1)[1] if "_" in p["name"] else p["name"] for p in phases]
    miou = {k: [p["val"][k]["miou"] for p in phases] for k, _ in MODELS}
    ratios, kept, precision = [], {"a": [], "b": []}, {"a": [], "b": []}
    for p in phases:
        if not p.get("pseudo"):
            continue
        ratios.append(p["ratio"])
        for k in ("a", "b"):
            summary = p["pseudo"][k]
            kept[k].append(100 * summary["kept_fraction"])
            values = [v for v in ((summary.get("quality") or {}).get("precision") or {}).values() if v is not None]
            precision[k].append(statistics.fmean(values) if values else None)
    return {"labels": labels, "miou": miou, "ratios": ratios, "kept": kept, "precision": precision}


def _title(results: Mapping[str, Any]) -> str:
    return f"{results['method'].upper()} {results['dataset']} split={results['split']}"


def plot_run(results: Mapping[str, Any]) -> Figure:
    """The three panels of one DMT/DMTC run (module docstring)."""
    curves = phase_curves(results)
    fig, (ax_phase, ax_pseudo, ax_class) = plt.subplots(1, 3, figsize=(17, 4.8), constrained_layout=True)
    fig.suptitle(f"{_title(results)} sid={results['sid']}: reported model {results['model'].upper()} "
                 f"{results['miou']:.2f} mIoU")
    x = range(len(curves["labels"]))
    for key, label in MODELS:
        ax_phase.plot(x, curves["miou"][key], marker="o", label=label)
    _phase_axes(ax_phase, curves["labels"])
    _pseudo_panel(ax_pseudo, curves["ratios"], {k: (v, None) for k, v in curves["kept"].items()},
                  {k: (v, None) for k, v in curves["precision"].items()})
    model = results["model"]
    warm = results["phases"][0]["val"][model]["per_class_iou"]
    _class_panel(ax_class, list(results["per_class_iou"]), [warm[c] for c in results["per_class_iou"]],
                 list(results["per_class_iou"].values()), None, None, f"model {model.upper()}")
    return fig


def _phase_axes(ax: Any, labels: Sequence[str]) -> None:
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("phase (label ratio r)")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title("mIoU per phase")
    ax.grid(alpha=0.3)
    ax.legend()


def _pseudo_panel(ax: Any, ratios: Sequence[float], kept: Mapping[str, tuple[list, list | None]],
                  precision: Mapping[str, tuple[list, list | None]]) -> None:
    """Kept fraction (solid) and kept-label precision (dashed) per ratio for A's and B's labels; ``(mean,
    std or None)`` per series."""
    ax.set_title("pseudo labels per ratio")
    ax.set_xlabel("label ratio r")
    ax.set_ylabel("%")
    for key, name in (("a", "A"), ("b", "B")):
        for series, style, what in ((kept, "-", "kept pixels"), (precision, "--", "precision of kept")):
            mean, std = series[key]
            if not mean or any(v is None for v in mean):
                continue
            line, = ax.plot(ratios, mean, style, marker="o", label=f"{what}, {name}'s labels")
            if std:
                ax.fill_between(ratios, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.2)
    if not ratios:
        ax.text(0.5, 0.5, "no DMT phase", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _class_panel(ax: Any, names: Sequence[str], warm: Sequence[float | None], final: Sequence[float | None],
                 warm_std: Sequence[float] | None, final_std: Sequence[float] | None, who: str) -> None:
    """Per-class IoU after the warm-up and at the end (absent classes as 0-height bars)."""
    x = range(len(names))
    width = 0.4
    ax.bar([i - width / 2 for i in x], [v or 0.0 for v in warm], width, yerr=warm_std, label="warm-up")
    ax.bar([i + width / 2 for i in x], [v or 0.0 for v in final], width, yerr=final_std, label="final")
    ax.set_xticks(list(x), names, rotation=45, ha="right", fontsize="small")
    ax.set_ylabel("IoU (%)")
    ax.set_title(f"per-class IoU, {who}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float]:
    present = [v for v in values if v is not None]
    if not present:
        return None, 0.0
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else 0.0


def sweep_curves(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over ``runs`` (the results of one setting, same phases) of :func:`phase_curves`."""
    per_run = [phase_curves(r) for r in runs]
    first = per_run[0]

    def band(get: Any) -> tuple[list, list]:
        pairs = [_mean_std(vs) for vs in zip(*(get(c) for c in per_run))]
        return [m for m, _ in pairs], [s for _, s in pairs]

    return {
        "labels": first["labels"], "ratios": first["ratios"],
        "miou": {k: band(lambda c, k=k: c["miou"][k]) for k, _ in MODELS},
        "kept": {k: band(lambda c, k=k: c["kept"][k]) for k in ("a", "b")},
        "precision": {k: band(lambda c, k=k: c["precision"][k]) for k in ("a", "b")},
    }


def plot_summary(summary: Mapping[str, Any], runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure:
    """The sweep figure: per DMT setting (``runs[setting] = results of its runs``) the phase curves as
    mean ± std bands and the per-class IoU of warm-up vs final; last, every setting's final mIoU (mean ±
    std) beside its published number."""
    dmt_rows = [r for r in summary["rows"] if r["warmup_miou"] is not None]
    height = 4.8 * (len(dmt_rows) + 1)
    fig, axes = plt.subplots(len(dmt_rows) + 1, 3, figsize=(17, height), constrained_layout=True, squeeze=False)
    fig.suptitle("sweep summary: mean ± sample std over the runs of each setting")
    for ax_row, row in zip(axes, dmt_rows):
        members = runs[" ".join(row["setting"])]
        curves = sweep_curves(members)
        x = list(range(len(curves["labels"])))
        for key, label in MODELS:
            mean, std = curves["miou"][key]
            line, = ax_row[0].plot(x, mean, marker="o", label=label)
            ax_row[0].fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                   color=line.get_color(), alpha=0.2)
        _phase_axes(ax_row[0], curves["labels"])
        ax_row[0].set_title(f"mIoU per phase, {row['label']} (n={row['n']})", fontsize="small")
        _pseudo_panel(ax_row[1], curves["ratios"], curves["kept"], curves["precision"])
        names = list(row["per_class_iou"])
        warm = [[m["phases"][0]["val"][m["model"]]["per_class_iou"].get(c) for m in members] for c in names]
        warm_stats = [_mean_std(v) for v in warm]
        final = [row["per_class_iou"][c] for c in names]
        _class_panel(ax_row[2], names, [m for m, _ in warm_stats], [f["mean"] if f else None for f in final],
                     [s for _, s in warm_stats], [f["std"] if f else 0.0 for f in final], "reported models")
    _published_panel(axes[-1][0], summary["rows"])
    for ax in axes[-1][1:]:
        ax.axis("off")
    return fig


def _published_panel(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Final mIoU (mean ± std) of every setting, with the published number beside it where there is one."""
    names = [r["label"] for r in rows]
    x = list(range(len(rows)))
    ours = ax.bar([i - 0.2 for i in x], [r["miou"]["mean"] for r in rows], 0.4,
                  yerr=[r["miou"]["std"] for r in rows], label="ours (mean ± std)")
    ax.bar_label(ours, fmt="%.2f", fontsize="small")
    published = [(i, r["published"]) for i, r in zip(x, rows) if r["published"] is not None]
    if published:
        theirs = ax.bar([i + 0.2 for i, _ in published], [v for _, v in published], 0.4, label="published")
        ax.bar_label(theirs, fmt="%.2f", fontsize="small")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title("final mIoU per setting vs published")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG, atomically, and close it."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
