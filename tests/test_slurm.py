"""Sweeps and DDP jobs through the ``hydra/launcher=slurm`` preset on a real one-node SLURM cluster
(tests/slurm_cluster.py); skipped with the reason where no cluster can start (no root, SLURM missing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
from conftest import REPO, tiny_run_overrides

PROBE = "+callbacks.probe._target_=probes.TrainerProbe"
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=20", "trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = slurm_cluster.unavailable()
    if reason:
        pytest.skip(reason)
    cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    slurm_cluster.stop(cluster)


def _sweep(cluster: slurm_cluster.Cluster, tmp: Path, args: list[str], timeout: float = 420
           ) -> subprocess.CompletedProcess:
    """``python train.py -m ...`` on the cluster: submits the jobs and waits for them, as a user would."""
    env = dict(cluster.env, PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(REPO / "train.py"), "--multirun", *tiny_run_overrides(tmp), *SLURM,
                           *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)


def _sweep_dir(tmp: Path) -> Path:
    (sweep,) = (tmp / "outputs" / "train" / "multirun").iterdir()
    return sweep


def _scripts(sweep: Path) -> list[str]:
    """The sbatch scripts submitit wrote for the sweep's jobs."""
    return [p.read_text() for p in (sweep / ".submitit").rglob("*_submission.sh")]


def test_the_preset_needs_a_device_count(tmp_path):
    """trainer.devices=auto cannot become a task count: one line before anything is submitted (no cluster
    needed)."""
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--multirun", *tiny_run_overrides(tmp_path),
                           "hydra/launcher=slurm", "strategy=ddp"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: trainer.devices=auto with hydra/launcher=slurm")


def test_a_sweep_runs_as_slurm_jobs(slurm, tmp_path):
    proc = _sweep(slurm, tmp_path, ["sid=0,1"])
    assert proc.returncode == 0, proc.stderr[-3000:] + slurm.log()
    sweep = _sweep_dir(tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 2
    assert sorted(json.loads((j / "results.json").read_text())["sid"] for j in jobs) == [0, 1]
    assert json.loads((sweep / "summary.json").read_text())["rows"][0]["n"] == 2  # the sweep's table, as locally
    scripts = _scripts(sweep)
    assert scripts and all("#SBATCH --partition=debug" in s for s in scripts)
    # a CPU job asks for no GPU (it must schedule on a GPU-less partition); one task: one device
    assert not any("gpus" in s for s in scripts) and all("#SBATCH --ntasks-per-node=1" in s for s in scripts)


def test_a_two_task_ddp_job(slurm, tmp_path):
    """trainer.devices=2 becomes 2 SLURM tasks per node; Lightning reads them as ranks 0 and 1."""
    out = tmp_path / "probe"
    proc = _sweep(slurm, tmp_path, ["strategy=ddp", "trainer.devices=2", PROBE, f"+callbacks.probe.out={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:] + slurm.log()
    (script,) = _scripts(_sweep_dir(tmp_path))
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --nodes=1" in script
    records = [json.loads(p.read_text()) for p in sorted(out.glob("rank*_fit0.json"))]
    assert [(r["global_rank"], r["world_size"]) for r in records] == [(0, 2), (1, 2)]
    (job,) = [p for p in _sweep_dir(tmp_path).iterdir() if (p / ".hydra").is_dir()]
    assert (job / "results.json").is_file()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_preempted_dmt_job_is_requeued_and_finishes_from_its_step(slurm, tmp_path):
    """USR1 mid-phase (SLURM's pre-timeout signal, sent by hand): the job saves its step, is requeued (once:
    submitit's requeue, not Lightning's too), and the requeued job resumes that phase at that step and finishes
    every phase."""
    out, marker = tmp_path / "probe", tmp_path / "paused"
    args = ["method=dmt", "method.phase.epochs=4", "method.phase.unlabeled_batch_size=2", PROBE,
            f"+callbacks.probe.out={out}", "+callbacks.pause._target_=probes.PauseAtStep",
            f"+callbacks.pause.marker={marker}", "+callbacks.pause.step=6"]
    env = dict(slurm.env, PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--multirun", *tiny_run_overrides(tmp_path),
                             *SLURM, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        _wait_for(marker.exists, 300, "the job to reach step 6 of phase 1")
        jobs = slurm.run("squeue", "-h", "-o", "%i").stdout.split()
        assert len(jobs) == 1, jobs
        assert slurm.run("scancel", "--signal=USR1", jobs[0]).returncode == 0
        # SLURM holds a requeued job back for a while (its BeginTime, ~2 min): start it now, the test's budget
        def pending_again() -> bool:
            show = slurm.run("scontrol", "show", "job", jobs[0]).stdout
            return "Restarts=1" in show and "JobState=PENDING" in show

        _wait_for(pending_again, 120, "the requeued job to wait in the queue")
        assert slurm.run("scontrol", "update", f"JobId={jobs[0]}", "StartTime=now").returncode == 0
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:] + slurm.log()
    sweep = _sweep_dir(tmp_path)
    (job,) = [p for p in sweep.iterdir() if (p / ".hydra").is_dir()]
    results = json.loads((job / "results.json").read_text())
    assert [p["name"] for p in results["phases"]] == ["phase0_warmup", "phase1_r0.5", "phase2_r1"]
    show = slurm.run("scontrol", "show", "job", jobs[0]).stdout
    assert "Restarts=1" in show, show
    logs = "\n".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "saved to" in logs and "requeued and continues from that step" in logs
    # the requeued process trained phase 1 from step 6 (not from its start), then phase 2
    first = json.loads((out / "rank0_fit0.json").read_text())
    assert (first["stage"], first["global_step"]) == ("mutual", 6)
    assert not list(job.rglob("hpc_ckpt*.ckpt"))  # Lightning did not save (nor requeue) on its own
