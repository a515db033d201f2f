"""Seed sweeps become one table: summary.{json,md,csv} in the sweep folder, and python -m dmtc.report."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

from conftest import REPO, tiny_run_overrides

from dmtc.summary import find_runs, summarize_runs

CLASSES = ["background", "cat", "dog"]


def _dmt_run(folder: Path, sid: int, final: dict[str, float], warmup: dict[str, float], per_class: list[float],
             overrides: list[str], dataset: str = "voc", split: str = "20") -> Path:
    """A finished DMT run folder as train.py leaves it (results.json, .hydra/overrides.yaml), with the
    given figures."""
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in [*overrides, f"sid={sid}"]))
    model = max("ab", key=lambda k: final[k])
    val = {k: {"miou": v, "per_class_iou": dict(zip(CLASSES, per_class))} for k, v in final.items()}
    warm = {k: {"miou": v, "per_class_iou": dict(zip(CLASSES, per_class))} for k, v in warmup.items()}
    results = {"task": "train", "method": "dmt", "dataset": dataset, "split": split, "sid": sid, "seed": 0,
               "backbone": "resnet101", "model": model, "miou": final[model],
               "per_class_iou": dict(zip(CLASSES, per_class)), "ensemble_miou": final["ens"],
               "warmup_miou": warmup, "phases": [{"name": "phase0_warmup", "val": warm},
                                                 {"name": "phase1_r1", "val": val}]}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_rows_are_mean_and_sample_std_over_the_sids_of_one_setting(tmp_path):
    base = ["method=dmt", "dataset=voc", "split=20"]
    runs = [
        _dmt_run(tmp_path / "s0", 0, {"a": 70.0, "b": 69.0, "ens": 71.0}, {"a": 60.0, "b": 61.0, "ens": 62.0},
                 [90.0, 60.0, 60.0], base),
        _dmt_run(tmp_path / "s1", 1, {"a": 68.0, "b": 72.0, "ens": 73.0}, {"a": 59.0, "b": 63.0, "ens": 64.0},
                 [92.0, 58.0, None], base),
        _dmt_run(tmp_path / "s2", 2, {"a": 71.0, "b": 70.0, "ens": 72.0}, {"a": 62.0, "b": 60.0, "ens": 63.0},
                 [91.0, 62.0, 64.0], base),
        _dmt_run(tmp_path / "other", 0, {"a": 50.0, "b": 51.0, "ens": 52.0}, {"a": 40.0, "b": 41.0, "ens": 42.0},
                 [80.0, 40.0, 30.0], [*base, "method.phase.gamma1=5"]),
    ]
    (tmp_path / "killed" / ".hydra").mkdir(parents=True)  # a run folder without results: listed only
    summary = summarize_runs(find_runs([tmp_path]))
    assert summary["unfinished"] == [str(tmp_path / "killed")]
    rows = {" ".join(r["setting"]): r for r in summary["rows"]}
    assert set(rows) == {"dataset=voc method=dmt split=20", "dataset=voc method.phase.gamma1=5 method=dmt split=20"}
    assert summary["shared_setting"] == ["dataset=voc", "method=dmt", "split=20"]
    assert sorted(r["label"] for r in summary["rows"]) == ["(every run)", "method.phase.gamma1=5"]
    row = rows["dataset=voc method=dmt split=20"]
    assert row["n"] == 3 and row["sids"] == [0, 1, 2] and row["runs"] == [str(p) for p in runs[:3]]
    finals = [70.0, 72.0, 71.0]  # each run reports its better model: A, B, A
    warmups = [60.0, 63.0, 62.0]  # the reported model's own warm-up
    assert row["miou"] == {"mean": round(statistics.fmean(finals), 4), "std": round(statistics.stdev(finals), 4),
                           "n": 3}
    assert row["warmup_miou"]["mean"] == round(statistics.fmean(warmups), 4)
    assert row["gain"]["mean"] == round(statistics.fmean([f - w for f, w in zip(finals, warmups)]), 4)
    assert row["a"]["mean"] == round(statistics.fmean([70.0, 68.0, 71.0]), 4)
    assert row["ensemble"]["std"] == round(statistics.stdev([71.0, 73.0, 72.0]), 4)
    assert row["per_class_iou"]["dog"] == {"mean": 62.0, "std": round(statistics.stdev([60.0, 64.0]), 4), "n": 2}
    assert row["published"] == 69.92 and row["vs_published"] == round(row["miou"]["mean"] - 69.92, 4)
    assert rows["dataset=voc method.phase.gamma1=5 method=dmt split=20"]["miou"] == {"mean": 51.0, "std": 0.0, "n": 1}


def test_report_cli_writes_the_three_files(tmp_path):
    _dmt_run(tmp_path / "runs" / "s0", 0, {"a": 60.0, "b": 58.0, "ens": 61.0}, {"a": 50.0, "b": 49.0, "ens": 52.0},
             [80.0, 50.0, 50.0], ["method=dmt"], dataset="synthetic", split="8")
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "dmtc.report", str(tmp_path / "runs"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][0]["miou"]["mean"] == 60.0 and summary["rows"][0]["published"] is None
    md = (out / "summary.md").read_text()
    assert "| (every run) | 1 | 60.00 ± 0.00 | 50.00 ± 0.00 | 10.00 ± 0.00 |" in md
    assert "Overrides of every row: method=dmt" in md and "60.00 ± 0.00" in proc.stdout
    with open(out / "summary.csv", newline="") as f:
        (line,) = list(csv.DictReader(f))
    assert float(line["miou_mean"]) == 60.0 and float(line["iou/cat_mean"]) == 50.0 and line["n"] == "1"


def test_report_cli_without_runs_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dmtc.report", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error:") and str(tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_seed_sweep_ends_with_its_summary_in_its_own_folder(tmp_path):
    """A 2-sid smoke sweep: its own sweep folder, job folders named with their sid, and a summary whose
    mean/std equal those of the two results.json files."""
    args = [*tiny_run_overrides(tmp_path), "sid=0,1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--multirun", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                             "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = list((tmp_path / "outputs" / "train" / "multirun").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 2 and all(f"sid-{i}" in job.name for i, job in enumerate(jobs))
    results = [json.loads((job / "results.json").read_text()) for job in jobs]
    summary = json.loads((sweep / "summary.json").read_text())
    (row,) = summary["rows"]
    mious = [r["miou"] for r in results]
    assert row["n"] == 2 and row["miou"]["mean"] == round(statistics.fmean(mious), 4)
    assert row["miou"]["std"] == round(statistics.stdev(mious), 4)
    for name in results[0]["per_class_iou"]:
        values = [r["per_class_iou"][name] for r in results if r["per_class_iou"][name] is not None]
        if values:
            assert row["per_class_iou"][name]["mean"] == round(statistics.fmean(values), 4)
    assert (sweep / "summary.md").is_file() and (sweep / "summary.csv").is_file()
    assert "Sweep summary" not in proc.stderr and "±" in proc.stdout  # the table is printed at the end
    assert "sid-0_1" in sweep.name  # named by the sweep's overrides

    # the same -m command again: the same sweep folder, whose finished jobs are not trained again
    (jobs[1] / "results.json").unlink()  # as if job 1 had crashed before its end
    again = subprocess.run([sys.executable, str(REPO / "train.py"), "--multirun", *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                              "WANDB_MODE": "disabled"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.name for p in (tmp_path / "outputs" / "train" / "multirun").iterdir()] == [sweep.name]
    assert (again.stdout + again.stderr).count("run is finished") == 1  # job 0; job 1 ran again
    assert json.loads((jobs[0] / "results.json").read_text()) == results[0]
    assert (jobs[1] / "results.json").is_file()


def test_a_long_run_name_keeps_the_swept_keys_and_hashes_the_rest():
    """Folder names stay within 120 characters; sid/seed/split and other short overrides stay readable, so
    two jobs of a sweep differ visibly, and the name is still unique (the hash covers everything)."""
    from dmtc.config import MAX_RUN_NAME, run_name

    fixed = ["dataset=folder", f"dataset.root=/data/{'x' * 90}", "dataset.num_classes=3",
             "dataset.class_names=[background,cat,dog]", "optim.lr=0.01"]

    def name(sid: int) -> str:
        lines = sorted([*fixed, f"sid={sid}"])
        return run_name("_".join(lines).replace("=", "-"), lines)  # as Hydra's override_dirname

    a, b = name(0), name(1)
    assert len(a) <= MAX_RUN_NAME and len(b) <= MAX_RUN_NAME and a != b
    assert "sid-0" in a and "sid-1" in b and "dataset-folder" in a and "optim.lr-0.01" in a
    assert "x" * 20 not in a and a.rsplit("_h-", 1)[1] != b.rsplit("_h-", 1)[1]
    assert name(0) == a  # the same command, the same folder
    assert run_name("sid-1_split-8", ["sid=1", "split=8"]) == "sid-1_split-8"  # short names are unchanged
