"""report.png and summary.png: valid PNGs whose panels hold the run's and the sweep's figures."""

from __future__ import annotations

import json

import cv2
import pytest
from test_summary import _dmt_run

from dmtc.plots import phase_curves, plot_run, plot_summary, save
from dmtc.summary import summarize


def _with_pseudo(folder, kept: float, precision: list[float]):
    """Give a fabricated run a pseudo-labelled phase: kept fraction and per-class precision of A and B."""
    path = folder / "results.json"
    results = json.loads(path.read_text())
    results["phases"][1]["ratio"] = 1.0
    results["phases"][0]["ratio"] = None
    quality = {"precision": dict(zip(["background", "cat", "dog"], precision))}
    results["phases"][1]["pseudo"] = {k: {"kept_fraction": kept, "quality": quality} for k in "ab"}
    path.write_text(json.dumps(results))
    return results


def test_run_plot_holds_the_phases_pseudo_labels_and_classes(tmp_path):
    folder = _dmt_run(tmp_path / "r", 0, {"a": 70.0, "b": 69.0, "ens": 71.0}, {"a": 60.0, "b": 61.0, "ens": 62.0},
                      [90.0, 60.0, None], ["method=dmt"])
    results = _with_pseudo(folder, 0.8, [90.0, 70.0, None])
    fig = plot_run(results)
    phase_ax, pseudo_ax, class_ax = fig.axes
    assert [line.get_label() for line in phase_ax.get_lines()] == ["A", "B", "A+B ensemble"]
    assert [list(line.get_ydata()) for line in phase_ax.get_lines()] == [[60.0, 70.0], [61.0, 69.0], [62.0, 71.0]]
    assert "mIoU" in phase_ax.get_ylabel() and phase_ax.get_title() and fig.get_suptitle()
    curves = {line.get_label(): list(line.get_ydata()) for line in pseudo_ax.get_lines()}
    assert curves["kept pixels, A's labels"] == [80.0] and curves["precision of kept, B's labels"] == [80.0]
    heights = [bar.get_height() for bar in class_ax.patches]
    assert heights == [90.0, 60.0, 0.0, 90.0, 60.0, 0.0]  # warm-up then final (absent class: 0)
    path = save(fig, tmp_path / "report.png")
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 300 and image.shape[1] > 800


def test_summary_plot_bands_are_mean_and_std_and_bars_hold_the_published_number(tmp_path):
    base = ["method=dmt", "dataset=voc", "split=20"]
    for sid, (a, b) in enumerate([(70.0, 69.0), (72.0, 68.0)]):
        folder = _dmt_run(tmp_path / f"s{sid}", sid, {"a": a, "b": b, "ens": 71.0}, {"a": 60.0, "b": 60.0, "ens": 61.0},
                          [90.0, 60.0, 50.0], base)
        _with_pseudo(folder, 0.5 + sid / 10, [80.0, 60.0, 40.0])
    summary = summarize([tmp_path])
    assert cv2.imread(str(tmp_path / "summary.png")) is not None
    runs = {" ".join(summary["rows"][0]["setting"]): [json.loads((tmp_path / f"s{i}" / "results.json").read_text())
                                                      for i in range(2)]}
    fig = plot_summary(summary, runs)
    phase_ax, pseudo_ax, class_ax, bars_ax = fig.axes[:4]
    a_line = phase_ax.get_lines()[0]
    assert list(a_line.get_ydata()) == [60.0, 71.0]  # mean of A over the two runs
    band = phase_ax.collections[0].get_paths()[0].vertices[:, 1]
    assert min(band) == pytest.approx(60.0) and max(band) == pytest.approx(71.0 + 2 ** 0.5)  # ± sample std
    kept = {line.get_label(): list(line.get_ydata()) for line in pseudo_ax.get_lines()}
    assert kept["kept pixels, A's labels"] == [pytest.approx(55.0)]
    ours, published = bars_ax.patches[0], bars_ax.patches[1]
    assert ours.get_height() == summary["rows"][0]["miou"]["mean"] and published.get_height() == 69.92
    assert phase_curves(runs[next(iter(runs))][0])["labels"] == ["warmup", "r1"]
