"""W&B panels (dmtc.dashboards, dmtc.dmt.pseudo_panels): an offline DMT run holds per-class tables, mask
overlays of fixed val images for A, B and the ensemble, and per-phase pseudo-label tables and overlays whose
figures are the run's own (results.json); upload sizes follow media.*."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, finished_wandb_records, tiny_run_overrides, wandb_history

from dmtc.dashboards import bounded, class_labels, spread, summary_rows
from dmtc.dmt.pseudo_panels import pseudo_table


def test_spread_picks_fixed_evenly_spaced_indices():
    assert spread(4, 10) == [0, 3, 6, 9]
    assert spread(3, 2) == [0, 1] and spread(0, 5) == [] and spread(2, 0) == []
    assert spread(1, 7) == [0]


def test_bounded_scales_the_longest_side_and_keeps_mask_values():
    image = np.zeros((100, 200, 3), np.uint8)
    mask = np.zeros((100, 200), np.uint8)
    mask[:, 100:] = 7
    small, masks = bounded(image, {"m": mask}, 50)
    assert small.shape == (25, 50, 3) and masks["m"].shape == (25, 50)
    assert set(np.unique(masks["m"])) == {0, 7}  # nearest: no blended class ids
    same, kept = bounded(image, {"m": mask}, 512)
    assert same is image and kept["m"] is mask
    assert class_labels(["bg", "car"]) == {0: "bg", 1: "car", 255: "ignore"}


def test_pseudo_table_rows_come_from_the_summary():
    summary = {"classes": {"bg": {"predicted": 10, "kept": 5, "threshold": 0.9},
                           "car": {"predicted": 0, "kept": 0, "threshold": None}},
               "quality": {"precision": {"bg": 80.0, "car": None}}}
    t = pseudo_table(summary)
    assert t.columns == ["class", "predicted", "kept", "kept_percent", "threshold", "precision"]
    assert t.data == [["bg", 10, 5, 50.0, 0.9, 80.0], ["car", 0, 0, None, None, None]]
    assert pseudo_table({"classes": summary["classes"]}).data[0][-1] is None  # no ground truth: no precision


def test_summary_rows_hold_mean_std_and_published():
    row = {"label": "split=8", "method": "dmt", "dataset": "city", "split": "8", "n": 2, "sids": [0, 1],
           "miou": {"mean": 60.0, "std": 1.0}, "warmup_miou": {"mean": 55.0, "std": 0.5},
           "gain": {"mean": 5.0, "std": 0.7}, "ensemble": {"mean": 61.0, "std": 0.2}, "published": 63.03,
           "vs_published": -3.03}
    columns, rows = summary_rows({"rows": [row]})
    assert dict(zip(columns, rows[0])) == {
        "setting": "split=8", "method": "dmt", "dataset": "city", "split": "8", "n": 2, "sids": "0,1",
        "miou_mean": 60.0, "miou_std": 1.0, "warmup_miou_mean": 55.0, "warmup_miou_std": 0.5, "gain_mean": 5.0,
        "gain_std": 0.7, "ensemble_mean": 61.0, "published": 63.03, "vs_published": -3.03}


def _latest(rows: list[dict], key: str) -> dict:
    """The fields of ``key`` in the last history row that logged it (W&B nests a media value's fields)."""
    for row in reversed(rows):
        fields = {k[len(key) + 1:]: v for k, v in row.items() if k.startswith(key + "/")}
        if fields:
            return fields
    raise AssertionError(f"nothing logged as {key}")


def _all(rows: list[dict], key: str) -> list[dict]:
    out = []
    for row in rows:
        fields = {k[len(key) + 1:]: v for k, v in row.items() if k.startswith(key + "/")}
        if fields:
            out.append(fields)
    return out


@pytest.fixture(scope="module")
def dmt_wandb_run(tmp_path_factory) -> Path:
    """A two-phase DMT smoke run logged to an offline W&B run, 2 images per panel, at most 48 px a side."""
    tmp = tmp_path_factory.mktemp("dashboards")
    run = tmp / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true")
    args = [*tiny_run_overrides(tmp), "method=dmt", "logger=csv_wandb", "media.val_images=2",
            "media.pseudo_images=2", "media.max_side=48", f"hydra.run.dir={run}"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wandb_dir,) = (run / "wandb").glob("offline-run-*")
    finished_wandb_records(wandb_dir)
    return run


def test_validation_tables_and_overlays_of_a_b_and_the_ensemble(dmt_wandb_run):
    run = dmt_wandb_run
    results = json.loads((run / "results.json").read_text())
    (wandb_dir,) = (run / "wandb").glob("offline-run-*")
    rows = wandb_history(wandb_dir)
    media = wandb_dir / "files"
    final_val = results["phases"][-1]["val"]  # the last validation re-validated the final phase's best A and B
    names = list(results["per_class_iou"])
    label_dir = next((run.parent / "cache" / "synthetic").glob("seed0-*")) / "labels" / "val"
    for key in ("a", "b", "ens"):
        table = _latest(rows, f"val/{key}/per_class")
        data = json.loads((media / table["path"]).read_text())
        assert data["columns"] == ["class", "iou"]
        assert {c: iou for c, iou in data["data"]} == pytest.approx(final_val[key]["per_class_iou"])
        examples = _latest(rows, f"val/{key}/examples")
        # the 10 val images: the first and the last (fixed), at most 48 px a side
        assert examples["count"] == 2 and examples["width"] == 48 and examples["height"] == 48
        assert examples["captions"] == [f"val_00000 ({key})", f"val_00009 ({key})"]
        for caption, layers in zip(examples["captions"], examples["all_masks"]):
            assert set(layers) == {"ground_truth", "prediction"}
            shown = cv2.imread(str(media / layers["ground_truth"]["path"]), cv2.IMREAD_UNCHANGED)
            truth = cv2.imread(str(label_dir / f"{caption.split()[0]}.png"), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(shown, cv2.resize(truth, (48, 48), interpolation=cv2.INTER_NEAREST))
        for path in examples["filenames"]:
            assert cv2.imread(str(media / path)).shape == (48, 48, 3)
    # every validation of every stage logged them (warm-up, two phases, each phase's re-validation)
    assert len(_all(rows, "val/ens/per_class")) >= 4
    legends = json.loads([i.value_json for r in finished_wandb_records(wandb_dir)  # the config's last state
                          if r.WhichOneof("record_type") == "config" for i in r.config.update
                          if i.key == "_wandb"][-1])["mask/class_labels"]
    legend = legends["val/ens/examples_wandb_delimeter_prediction"]["value"]
    assert legend == {**{str(i): n for i, n in enumerate(names)}, "255": "ignore"}


def test_pseudo_label_tables_and_overlays_per_phase(dmt_wandb_run):
    run = dmt_wandb_run
    results = json.loads((run / "results.json").read_text())
    (wandb_dir,) = (run / "wandb").glob("offline-run-*")
    rows = wandb_history(wandb_dir)
    media = wandb_dir / "files"
    phases = [p for p in results["phases"] if p["pseudo"]]
    assert len(phases) == 2
    for key in ("a", "b"):
        tables = _all(rows, f"pseudo/{key}/classes")
        assert len(tables) == len(phases)  # one per phase
        for table, phase in zip(tables, phases):
            pseudo = phase["pseudo"][key]
            data = json.loads((media / table["path"]).read_text())
            got = {r[0]: dict(zip(data["columns"][1:], r[1:])) for r in data["data"]}
            for name, c in pseudo["classes"].items():
                assert (got[name]["predicted"], got[name]["kept"]) == (c["predicted"], c["kept"])
                assert got[name]["threshold"] == c["threshold"]
                assert got[name]["precision"] == pseudo["quality"]["precision"][name]
        for examples in _all(rows, f"pseudo/{key}/examples"):
            assert examples["count"] == 2
            for layers in examples["all_masks"]:
                assert set(layers) == {"pseudo_label", "ignored", "ground_truth"}
                ignored = cv2.imread(str(media / layers["ignored"]["path"]), cv2.IMREAD_UNCHANGED)
                assert set(np.unique(ignored)) <= {0, 1}
        assert len(_all(rows, f"pseudo/{key}/examples")) == len(phases)


def test_media_val_images_0_logs_tables_but_no_overlays(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true")
    run = tmp_path / "run"
    args = [*tiny_run_overrides(tmp_path), "logger=wandb", "media.val_images=0", f"hydra.run.dir={run}"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wandb_dir,) = (run / "wandb").glob("offline-run-*")
    finished_wandb_records(wandb_dir)
    rows = wandb_history(wandb_dir)
    assert _all(rows, "val/a/per_class") and not _all(rows, "val/a/examples")
    assert not list((wandb_dir / "files" / "media").glob("images/**/*.png"))
