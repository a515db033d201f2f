"""A resumed run continues its logs: the same W&B run id (offline runs named after it), one metrics.csv
whose rows cover every attempt once; overwrite=true and Hydra multirun jobs start their own."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from conftest import REPO, finished_wandb_records, tiny_run_overrides
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger

from dmtc.errors import DMTCError
from dmtc.loggers import COMMITTED_FILE, WANDB_ID_FILE, CSVLogger, wandb_run_id
from dmtc.trainer import build_loggers

TESTS = Path(__file__).resolve().parent


class KillAtStep(L.Callback):
    """Kill -9 the training process once ``global_step`` reaches ``step`` (a crash at a known point), in the
    first fit of ``stage`` (``warmup``/``mutual`` of a DMT run; None: any fit)."""

    def __init__(self, step: int, stage: str | None = None) -> None:
        self.step, self.stage = step, stage

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:  # noqa: D102
        if self.stage is not None and getattr(pl_module, "stage", None) != self.stage:
            return
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _train(tmp: Path, overrides: list[str], flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """train.py in a subprocess with W&B offline; the tests folder importable (for KillAtStep)."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=path)
    return subprocess.run([sys.executable, str(REPO / "train.py"), *flags, *tiny_run_overrides(tmp), *overrides],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def _offline_runs(run: Path) -> list[str]:
    """Offline W&B run folders in start order: by the time in their name (1 s resolution), then by the
    folder's last change (two runs started within one second)."""
    folders = (run / "wandb").glob("offline-run-*")
    return [p.name for p in sorted(folders, key=lambda p: (p.name.split("-")[2], p.stat().st_mtime_ns))]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]], str]:
    text = path.read_text()
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader), text


def test_killed_run_resumes_one_csv_log_and_one_wandb_run(tmp_path):
    """Killed (-9) in its last batch (after the checkpoint of epoch 1 = step 1 and the rows of step 2), rerun:
    one W&B run id, one offline folder per attempt named after it, and one metrics.csv holding every step
    once."""
    run = tmp_path / "run"
    # split=1: 40 labeled images, 2 batches per epoch; validation and last.ckpt after each epoch
    overrides = ["split=1", "trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                 "logger=csv_wandb", f"hydra.run.dir={run}"]
    killed = _train(tmp_path, [*overrides, "+callbacks.kill._target_=test_loggers.KillAtStep",
                               "+callbacks.kill.step=4"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run / "results.json").exists()
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    assert _offline_runs(run) and all(name.endswith(f"-{run_id}") for name in _offline_runs(run))
    _, rows, _ = _read_csv(run / "csv" / "metrics.csv")
    assert max(int(r["step"]) for r in rows) == 2  # a row beyond the checkpoint (step 1) that the rerun redoes

    rerun = _train(tmp_path, overrides)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["steps"] == 4
    assert (run / WANDB_ID_FILE).read_text().strip() == run_id
    names = _offline_runs(run)
    assert len(names) == 2 and all(name.endswith(f"-{run_id}") for name in names), names

    header, rows, text = _read_csv(run / "csv" / "metrics.csv")
    assert text.count(",".join(header)) == 1  # one header line
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps)
    assert [int(r["step"]) for r in rows if r["train/a/loss"]] == list(range(4))  # both attempts, each step once
    # per epoch (steps 1 and 3, the killed attempt's step-1 row kept once), then the final re-validation
    # of the best checkpoint at the run's last step
    assert [int(r["step"]) for r in rows if r["val/miou"]] == [1, 3, 4]


@pytest.mark.filterwarnings("ignore:There is a wandb run already in progress")  # the in-process rerun: same id
def test_rerun_keeps_the_wandb_run_and_csv_log_overwrite_starts_new_ones(compose_cfg, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg(overrides=["logger=csv_wandb"])
    run = Path(cfg.paths.output_dir)
    metrics = run / "csv" / "metrics.csv"

    def wandb_logger(loggers: list) -> WandbLogger:
        return next(lg for lg in loggers if isinstance(lg, WandbLogger))

    try:
        first = build_loggers(cfg)
        run_id = (run / WANDB_ID_FILE).read_text().strip()
        assert wandb_logger(first).experiment.id == run_id
        csv_logger = next(lg for lg in first if isinstance(lg, CSVLogger))
        csv_logger.log_metrics({"train/a/loss": 1.0}, step=0)
        csv_logger.finalize("success")

        again = build_loggers(cfg)  # the rerun of the same command (results.json deleted)
        assert wandb_logger(again).experiment.id == run_id
        assert [r["step"] for r in _read_csv(metrics)[1]] == ["0"]

        fresh = build_loggers(compose_cfg(overrides=["logger=csv_wandb", "overwrite=true"]))
        new_id = (run / WANDB_ID_FILE).read_text().strip()
        assert new_id != run_id and wandb_logger(fresh).experiment.id == new_id  # the old run was finished
        assert not metrics.exists() and not (run / "csv" / COMMITTED_FILE).exists()
    finally:
        wandb.finish()
    assert [name.rsplit("-", 1)[1] for name in _offline_runs(run)] == [run_id, new_id]


def test_multirun_jobs_get_their_own_wandb_runs(tmp_path):
    proc = _train(tmp_path, ["sid=0,1", "logger=wandb", "trainer.limit_train_batches=1",
                             "trainer.limit_val_batches=1"], flags=("--multirun",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = list((tmp_path / "outputs" / "train" / "multirun").iterdir())  # the sweep's own folder
    jobs = [p for p in sweep.iterdir() if (p / ".hydra").is_dir()]  # (and wandb/: the sweep summary's run)
    assert len(jobs) == 2
    ids = [(job / WANDB_ID_FILE).read_text().strip() for job in jobs]
    assert ids[0] != ids[1]
    for job, run_id in zip(jobs, ids):  # each job logged to its own W&B run, in its own folder
        names = _offline_runs(job)
        assert len(names) == 1 and names[0].endswith(f"-{run_id}"), (job.name, names)
        # filed as one sweep: group = the sweep folder, job type = the method, tags; the config; the summary
        records = finished_wandb_records(job / "wandb" / names[0])
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        sid = json.loads((job / "results.json").read_text())["sid"]
        assert run.run_group == sweep.name and run.job_type == "supervised"
        assert {"dataset:synthetic", "split:8", f"sid:{sid}"} <= set(run.tags)
        config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
                  for i in r.config.update}
        assert config["dataset"]["name"] == "synthetic" and config["sid"] == sid and "lr" in config["optim"]
        summary = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for r in records
                   if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
        assert summary["final/miou"] == json.loads((job / "results.json").read_text())["miou"]
    # the sweep's summary table, once, in a run of its own beside the jobs' (same group, job type summary)
    (summary_run,) = (sweep / "wandb").glob("offline-run-*")
    records = finished_wandb_records(summary_run)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_group == sweep.name and run.job_type == "summary" and run.display_name == f"{sweep.name}-summary"
    (path,) = (summary_run / "files" / "media" / "table" / "summary").glob("table_*.table.json")
    table = json.loads(path.read_text())
    (row,) = [dict(zip(table["columns"], r)) for r in table["data"]]
    (expected,) = json.loads((sweep / "summary.json").read_text())["rows"]
    assert (row["n"], row["sids"]) == (2, "0,1")
    assert row["miou_mean"] == pytest.approx(expected["miou"]["mean"])
    assert row["miou_std"] == pytest.approx(expected["miou"]["std"])


def _rows(path: Path) -> list[dict[str, str]]:
    return _read_csv(path)[1]


def test_csv_log_of_lightnings_csvlogger_is_continued_with_one_header(tmp_path):
    old = LightningCSVLogger(tmp_path, name="csv", version="")
    for step in range(2):
        old.log_metrics({"train/a/loss": 1.0 - step / 10}, step=step)
    old.save()
    new = CSVLogger(tmp_path, name="csv", version="")
    new.log_metrics({"val/miou": 50.0}, step=2)  # a new column: the header is widened, not repeated
    new.save()
    header, rows, text = _read_csv(tmp_path / "csv" / "metrics.csv")
    assert header == ["step", "train/a/loss", "val/miou"] and text.count("step,") == 1
    assert [(r["step"], r["train/a/loss"], r["val/miou"]) for r in rows] == [
        ("0", "1.0", ""), ("1", "0.9", ""), ("2", "", "50.0")]


def test_csv_rows_after_the_last_checkpoint_and_cut_lines_are_dropped(tmp_path):
    first = CSVLogger(tmp_path)
    first.log_metrics({"loss": 1.0}, step=0)
    first.after_save_checkpoint(None)  # a checkpoint holds the state after step 0
    first.log_metrics({"loss": 0.9}, step=1)
    first.save()
    path = tmp_path / "csv" / "metrics.csv"
    with path.open("a") as f:
        f.write("0.8")  # the killed process's half-written line
    second = CSVLogger(tmp_path)
    second.log_hyperparams({"lr": 0.1})  # opens the log, as build_loggers does
    assert [r["step"] for r in _rows(path)] == ["0"]  # trimmed as soon as the rerun opens its log
    second.log_metrics({"loss": 0.85}, step=1)
    second.finalize("success")
    assert [(r["step"], r["loss"]) for r in _rows(path)] == [("0", "1.0"), ("1", "0.85")]
    assert json.loads((tmp_path / "csv" / COMMITTED_FILE).read_text()) == {"rows": 2}


def test_csv_rows_beyond_the_first_new_step_are_dropped(tmp_path):
    """A run retrained from an older state (no checkpoint marks the newer rows as replaced): the step
    column still never goes back."""
    first = CSVLogger(tmp_path)
    for step in range(6):
        first.log_metrics({"loss": 1.0}, step=step)
    first.finalize("success")
    second = CSVLogger(tmp_path)
    second.log_metrics({"loss": 0.5}, step=3)
    second.save()
    assert [r["step"] for r in _rows(tmp_path / "csv" / "metrics.csv")] == ["0", "1", "2", "3", "3"]


def test_csv_resume_false_starts_a_new_log(tmp_path):
    first = CSVLogger(tmp_path)
    first.log_metrics({"loss": 1.0}, step=0)
    first.finalize("success")
    second = CSVLogger(tmp_path, resume=False)
    second.log_metrics({"loss": 0.5}, step=0)
    second.save()
    assert [r["loss"] for r in _rows(tmp_path / "csv" / "metrics.csv")] == ["0.5"]
    assert not (tmp_path / "csv" / COMMITTED_FILE).exists()


def test_wandb_run_id_file(tmp_path, monkeypatch):
    run_id = wandb_run_id(tmp_path)
    assert (tmp_path / WANDB_ID_FILE).read_text() == run_id + "\n"
    assert wandb_run_id(tmp_path) == run_id
    fresh = wandb_run_id(tmp_path, fresh=True)
    assert fresh != run_id and wandb_run_id(tmp_path) == fresh
    (tmp_path / WANDB_ID_FILE).write_text("my run/1\n")
    with pytest.raises(DMTCError, match="not a W&B run id"):
        wandb_run_id(tmp_path)
    # that only rank 0 writes the file is checked on two real ranks: test_regressions.test_ddp_runs_two_ranks
