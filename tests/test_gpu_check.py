"""benchmarks/gpu_check.py in its CPU quick mode, as CI runs it: every section and field of its JSON, and the
projection's inputs pinned to DMT's protocol (DESIGN §3)."""

import json
import os
import subprocess
import sys

from conftest import REPO

MODES = ("fp32", "amp", "amp_cl", "amp_cl_compile")


def test_quick_cpu_run_reports_every_field(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--budget-s", "100000", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["cpu"] and report["date"]
    assert report["command"].startswith("python benchmarks/gpu_check.py")
    assert report["machine"]["peak_tflops"] is None  # a CPU has no tensor-core peak: MFU is None below

    train = report["train"]
    grid = {(r["dataset"], r["step"], r["dmtc"], r["mode"]) for r in train}
    assert grid == {(d, s, m, mode) for d in ("voc", "city") for s in ("warmup", "mutual") for m in (False, True)
                    for mode in MODES} and len(train) == 32
    for row in train:
        assert row["skipped"] is None
        for field in ("step_ms", "steps_per_s", "images_per_s", "flops_per_step", "tflops_per_s"):
            assert row[field] > 0, (row, field)
        assert row["mfu"] is None and row["peak_memory_gib"] is None and row["host_syncs_per_step"] is None
        assert row["precision"] == "32-true"  # precision=auto on a CPU
        assert row["channels_last"] == (row["mode"] in ("amp_cl", "amp_cl_compile"))
        assert row["compile"] == (row["mode"] == "amp_cl_compile")
        per_step = sum(row["batch_per_model"].values())  # the protocol's 8 images per model and step
        assert abs(row["images_per_s"] - per_step * row["steps_per_s"]) <= 0.01 * row["images_per_s"] + 0.05
    flops = {(r["dataset"], r["step"], r["dmtc"]): r["flops_per_step"] for r in train if r["mode"] == "fp32"}
    for dataset in ("voc", "city"):
        for step in ("warmup", "mutual"):
            assert flops[(dataset, step, True)] > flops[(dataset, step, False)]  # the projection head
    assert {r["batch_per_model"]["unlabeled"] for r in train if r["step"] == "mutual" and r["dataset"] == "city"} == {6}
    assert {r["batch_per_model"]["labeled"] for r in train if r["step"] == "warmup"} == {8}

    assert report["labeling"]["images_per_s"] > 0 and report["labeling"]["size"] == [32, 64]
    evaluation = {(tuple(r["size"]), r["flip"], r["precision"]): r for r in report["evaluation"]}
    assert set(evaluation) == {(s, f, p) for s in ((32, 64), (64, 128)) for f in (False, True)
                               for p in ("32-true", "bf16-mixed")}
    assert all(r["images_per_s"] > 0 for r in report["evaluation"])
    assert report["input"] and all(r["samples_per_s"] > 0 and r["model_demand_samples_per_s"] > 0
                                   and isinstance(r["input_bound"], bool) for r in report["input"])

    projection = report["projection"]
    city, voc = projection["city-1/8"]["schedule"], projection["voc-1/20"]["schedule"]
    assert (city["labeled"], city["unlabeled"], city["warmup_steps"], city["phase_steps"]) == (371, 2604, 7820, 4340)
    assert (voc["labeled"], voc["unlabeled"], voc["warmup_steps"], voc["phase_steps"]) == (530, 10052, 8844, 5744)
    assert city["phases"] == voc["phases"] == 5
    for name in ("city-1/8", "voc-1/20"):
        for method in ("dmt", "dmtc"):
            t = projection[name][method]
            parts = t["warmup_h"] + t["phases_train_h"] + t["labeling_h"] + t["validation_h"]
            assert t["total_h"] > 0 and abs(t["total_h"] - parts) < 0.02
    assert "Projected protocol wall time" in proc.stdout
