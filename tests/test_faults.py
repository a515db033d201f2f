"""Crash-safe runs (issue 15), with real subprocesses of train.py and real faults: kill -9 at seeded random
moments of every phase of a DMT smoke run, a truncated last.ckpt, NaN losses, SIGTERM / SIGINT, a second
command on a busy run folder and a file-size limit; plus the pieces they rest on (atomic checkpoints, the
resume fallback, the divergence guard) on a real Trainer.

All runs share one synthetic dataset (module-scoped cache) and one uninterrupted reference run."""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, tiny_run_overrides

from dmtc.checkpoint_io import PREVIOUS, AtomicCheckpointIO, checkpoint_step, resume_checkpoint
from dmtc.divergence import DivergenceError, DivergenceGuard
from dmtc.errors import OutputError
from dmtc.files import temp_sibling

TESTS = Path(__file__).resolve().parent
SEED = 15
# DMT on the tiny set: warm-up 2 steps; phases r = 0.5, 1.0 of 2 epochs x 4 batches (validation at steps 4, 8)
DMT = ["method=dmt", "method.ratios=[0.5,1.0]", "method.phase.epochs=2"]
MONITOR_WARNING = "could not find the monitored key"


# -- faults injected through the config (+callbacks.<name>._target_=test_faults.<Class>) --------------------
class SignalAtStep(L.Callback):
    """Send ``signum`` to this process once ``global_step`` reaches ``step`` in a fit of ``stage``."""

    def __init__(self, step: int, stage: str | None = None, signum: str = "SIGTERM") -> None:
        self.step, self.stage, self.signum, self.sent = step, stage, getattr(signal, signum), False

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # noqa: D102
        if self.stage is not None and getattr(pl_module, "stage", None) != self.stage:
            return
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class PoisonAtStep(L.Callback):
    """Make model ``model``'s first weight NaN after step ``step`` of ``stage``: the next loss is NaN."""

    def __init__(self, step: int, stage: str | None = None, model: str = "a") -> None:
        self.step, self.stage, self.model = step, stage, model

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # noqa: D102
        if self.stage is not None and getattr(pl_module, "stage", None) != self.stage:
            return
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.models[self.model].parameters()).fill_(float("nan"))


class WaitForFile(L.Callback):
    """Hold training at its start until ``path`` exists (at most 120 s): a run that keeps its folder busy."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: D102
        _wait(lambda: self.path.exists(), 120, f"{self.path} never appeared")


# -- helpers ---------------------------------------------------------------------------------------------
def _wait(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"train.py ended (rc {proc.returncode}) before: {what}")
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", PYTHONPATH=path)


def _args(base: Path, run: Path, *extra: str, method: tuple[str, ...] = tuple(DMT)) -> list[str]:
    return [str(REPO / "train.py"), *tiny_run_overrides(base), *method, f"hydra.run.dir={run}", *extra]


def _start(base: Path, run: Path, *extra: str, log: Path, method: tuple[str, ...] = tuple(DMT),
           **kwargs) -> subprocess.Popen:
    """train.py in the background, its stdout and stderr in ``log`` (no pipe to fill)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, *_args(base, run, *extra, method=method)], cwd=base, env=_env(),
                                stdout=out, stderr=subprocess.STDOUT, **kwargs)


def _run(base: Path, run: Path, *extra: str, method: tuple[str, ...] = tuple(DMT), **kwargs
         ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *_args(base, run, *extra, method=method)], cwd=base, env=_env(),
                          capture_output=True, text=True, timeout=300, **kwargs)


def _keys(obj):
    """The key structure of a results.json (values, timings and null IoUs may differ between runs)."""
    if isinstance(obj, dict):
        return {k: _keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_keys(v) for v in obj]
    return None


def _assert_same_run(run: Path, reference: dict) -> dict:
    """``run`` finished with the same phases, steps and results.json fields as the uninterrupted run."""
    results = json.loads((run / "results.json").read_text())
    assert [(p["name"], p["ratio"], p["steps"]) for p in results["phases"]] == [
        (p["name"], p["ratio"], p["steps"]) for p in reference["phases"]]
    assert results["steps"] == reference["steps"]
    assert _keys(results) == _keys(reference)
    assert all(Path(results["checkpoints"][k]).is_file() for k in "ab")
    assert not list(run.rglob("last.ckpt")) and not list(run.rglob(PREVIOUS)) and not list(run.rglob(".*.tmp"))
    assert not (run / "run.lock").exists()
    return results


def _clean(text: str) -> None:
    """What no user should see."""
    assert "Traceback" not in text, text[-3000:]
    assert MONITOR_WARNING not in text, text[-3000:]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The module's folder: one synthetic dataset cache for all runs."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference(base) -> dict:
    """The uninterrupted DMT run every faulted run must end like."""
    proc = _run(base, base / "reference")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((base / "reference" / "results.json").read_text())


# -- kill -9 ---------------------------------------------------------------------------------------------
def _pngs(store: str, at_least: int):
    return lambda run: len(list((run / store / "label").glob("*.png"))) >= at_least


def _moments(rng: random.Random) -> list[tuple[str, str, object, float]]:
    """Seeded kill moments in run order: (what runs then, its phase folder, the condition on the run folder that
    starts the moment, a random delay after it in s). Labeling moments are "after the k-th label file"."""
    p1, p2 = "phase1_r0.5", "phase2_r1"

    def exists(path: str):
        return lambda run: (run / path).exists()

    return [
        ("warm-up", "phase0_warmup", exists("csv/hparams.yaml"), rng.uniform(0.0, 0.5)),
        ("end of the warm-up", "phase0_warmup", lambda run: any((run / "phase0_warmup").rglob("best-b-*.ckpt")),
         rng.uniform(0.0, 0.1)),
        ("phase 1: A labels", p1, _pngs(f"{p1}/pseudo_a", rng.randint(1, 30)), rng.uniform(0.0, 0.02)),
        ("phase 1: B labels", p1, _pngs(f"{p1}/pseudo_b", rng.randint(1, 30)), rng.uniform(0.0, 0.02)),
        ("phase 1: first epoch", p1, exists(f"{p1}/pseudo_b/manifest.json"), rng.uniform(0.0, 0.15)),
        ("phase 1: second epoch", p1, exists(f"{p1}/checkpoints/last.ckpt"), rng.uniform(0.0, 0.1)),
        ("phase 2: A labels", p2, _pngs(f"{p2}/pseudo_a", rng.randint(1, 30)), rng.uniform(0.0, 0.02)),
        ("phase 2: first epoch", p2, exists(f"{p2}/pseudo_b/manifest.json"), rng.uniform(0.0, 0.15)),
        ("phase 2: second epoch", p2, exists(f"{p2}/checkpoints/last.ckpt"), rng.uniform(0.0, 0.1)),
    ]


def test_kill9_at_seeded_random_moments_of_every_phase_ends_like_an_uninterrupted_run(base, reference):
    """One run killed -9 again and again (each rerun is killed at the next moment: in the warm-up, both
    models' labeling, both epochs of both phases; each at a seeded random point: after the k-th label file, or a
    random delay after the file that starts the moment), then rerun to the end: the same phases, steps and
    results.json fields as the uninterrupted run; every rerun takes over the dead run's lock with one warning
    and shows no traceback."""
    moments = _moments(random.Random(SEED))
    run, killed, last_pid = base / "killed", [], None
    for i, (what, phase, started, delay) in enumerate(moments):
        later = [m[2] for m in moments[i:]]
        if (run / phase / "done.json").exists() or any(cond(run) for cond in later):  # an earlier kill came after
            continue
        log = base / f"kill{i}.log"
        proc = _start(base, run, log=log)
        try:
            _wait(lambda cond=started: cond(run), 240, f"{what} never came", proc)
            time.sleep(delay)  # the seeded random offset into the moment
            alive = proc.poll() is None
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        text = log.read_text()
        _clean(text)
        if last_pid is not None:
            assert f"taking over the lock of pid {last_pid} on host {socket.gethostname()}" in text
        if not alive:  # it finished first
            break
        assert proc.returncode == -signal.SIGKILL
        killed.append((phase, f"{what} +{delay:.2f}s"))
        last_pid = proc.pid
    assert len(killed) >= 5 and {k[0] for k in killed} == {"phase0_warmup", "phase1_r0.5", "phase2_r1"}, killed
    assert not (run / "results.json").exists()
    final = _run(base, run)
    assert final.returncode == 0, final.stderr[-3000:]
    _clean(final.stdout + final.stderr)
    assert f"taking over the lock of pid {last_pid}" in final.stdout + final.stderr
    _assert_same_run(run, reference)


# -- SIGTERM / SIGINT ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sigtermed(base) -> tuple[Path, subprocess.CompletedProcess]:
    """A DMT run sent SIGTERM at step 6 of phase 1 (after the validation of step 4, mid second epoch)."""
    run = base / "sigterm"
    proc = _run(base, run, "+callbacks.term._target_=test_faults.SignalAtStep", "+callbacks.term.step=6",
                "+callbacks.term.stage=mutual")
    return run, proc


def test_sigterm_mid_phase_saves_the_current_step_and_the_rerun_continues_from_it(base, reference, sigtermed,
                                                                                  tmp_path):
    source, proc = sigtermed
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    last = source / "phase1_r0.5" / "checkpoints" / "last.ckpt"
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (f"interrupted: stopped by SIGTERM at step 6 of phase 1/2 r=0.5 (A on B's, B on A's labels): "
                         f"saved to {last}; rerun the same command to continue from that step")
    _clean(proc.stdout + proc.stderr)
    assert checkpoint_step(last) == 6  # the step in progress, not the last validation (step 4)
    assert checkpoint_step(last.with_name(PREVIOUS)) == 4  # the previous good state is kept beside it
    assert not (source / "results.json").exists() and not (source / "phase1_r0.5" / "done.json").exists()

    run = tmp_path / "run"
    shutil.copytree(source, run)
    rerun = _run(base, run)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    _clean(log)
    assert f"phase1_r0.5: resuming from {run / 'phase1_r0.5' / 'checkpoints' / 'last.ckpt'} (step 6)" in log
    assert "phase0_warmup finished earlier" in log and "reusing complete pseudo-label store" in log
    _assert_same_run(run, reference)


def test_truncated_last_checkpoint_warns_once_and_resumes_from_the_previous_one(base, reference, sigtermed,
                                                                                tmp_path):
    """last.ckpt cut to a third (as by a kill during a copy): the rerun warns once naming it, sets it aside and
    resumes from the previous good state (last.prev.ckpt, step 4), not from the phase start."""
    run = tmp_path / "run"
    shutil.copytree(sigtermed[0], run)
    last = run / "phase1_r0.5" / "checkpoints" / "last.ckpt"
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size // 3)
    # what a kill -9 during other writes leaves: removed by the rerun, which holds the folder
    leftovers = [temp_sibling(run / "phase1_r0.5" / "done.json"), temp_sibling(run / "csv" / "metrics.csv")]
    for leftover in leftovers:
        leftover.write_text("half a file")
    rerun = _run(base, run)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    _clean(log)
    assert log.count(f"checkpoint {last} is unreadable") == 1, log[-3000:]
    assert "set aside as last.ckpt.corrupt; resuming from" in log
    assert f"resuming from {last.with_name(PREVIOUS)} (step 4)" in log
    assert last.with_name("last.ckpt.corrupt").is_file()
    _assert_same_run(run, reference)


def test_ctrl_c_mid_phase_saves_the_step_it_arrived_after(base):
    """A SIGINT is handed to Lightning's graceful stop as a SIGTERM: the step it came after is saved."""
    run = base / "sigint"
    proc = _run(base, run, "+callbacks.int._target_=test_faults.SignalAtStep", "+callbacks.int.step=5",
                "+callbacks.int.stage=mutual", "+callbacks.int.signum=SIGINT")
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-3000:]
    _clean(proc.stdout + proc.stderr)
    last = run / "phase1_r0.5" / "checkpoints" / "last.ckpt"
    assert proc.stderr.strip().splitlines()[-1] == (
        "interrupted: stopped by SIGINT (Ctrl-C) at step 5 of phase 1/2 r=0.5 (A on B's, B on A's labels): saved "
        f"to {last}; rerun the same command to continue from that step")
    assert "Received SIGTERM" not in proc.stdout + proc.stderr  # Lightning's line would name the wrong signal
    assert checkpoint_step(last) == 5 and not (run / "run.lock").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_labeling_is_one_line_and_the_half_written_store_is_not_trusted(base, signum):
    """Today's 75-line traceback: SIGTERM or Ctrl-C while model A labels ends in one line, status 128 + signal,
    and the store it was writing has no manifest (the rerun rewrites it: test_dmt_pipeline)."""
    run = base / f"label-{signum.name}"
    store = run / "phase1_r0.5" / "pseudo_a"
    log = base / f"label-{signum.name}.log"
    proc = _start(base, run, "dataset.val_batch_size=1", log=log)
    try:
        _wait(lambda: any((store / "label").glob("*.png")), 240, "labeling never started", proc)
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 128 + signum
    finally:
        proc.kill()
        proc.wait()
    text = log.read_text()
    _clean(text)
    name = "SIGINT (Ctrl-C)" if signum == signal.SIGINT else "SIGTERM"
    assert text.strip().splitlines()[-1] == (
        f"interrupted: stopped by {name} before a training step could be saved: what was saved so far (checkpoints, "
        "finished phases, complete pseudo-label stores) is kept; rerun the same command to continue")
    assert (run / "phase0_warmup" / "done.json").is_file() and not (store / "manifest.json").exists()
    assert not list(store.rglob(".*.tmp")) and not (run / "run.lock").exists()


# -- divergence ------------------------------------------------------------------------------------------
def test_nan_loss_from_a_huge_learning_rate_stops_at_once_without_results(base):
    run = base / "lr1e8"
    # all 40 images labeled: 4 steps per epoch, 12 in all
    proc = _run(base, run, "split=1", "optim.lr=1e8", "trainer.max_epochs=3", method=("method=supervised",))
    assert proc.returncode == 1
    _clean(proc.stdout + proc.stderr)
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: training diverged in supervised (A): the loss of model A is not finite "
                            "(NaN or inf) at step "), error
    assert "optim.lr=1e7, a tenth of 1e8" in error and f"hydra.run.dir={run}" in error
    assert "precision" not in error  # 32-true already
    step = int(error.split(" at step ")[1].split(";")[0])
    assert step < 12  # at once, not at the end of the 3 epochs
    assert not (run / "results.json").exists() and not (run / "run.lock").exists()


def test_nan_after_a_checkpoint_names_phase_model_and_checkpoint_and_a_lower_lr_continues_from_it(
        base, reference):
    """Model B's loss turns NaN at step 7 of phase 1: one error naming the phase, model B, the step and the
    last good checkpoint (step 4, not overwritten); the rerun with a lower method.phase.lr in the same folder
    resumes from that checkpoint at the new rate and ends like the uninterrupted run."""
    run = base / "poisoned"
    proc = _run(base, run, "+callbacks.nan._target_=test_faults.PoisonAtStep", "+callbacks.nan.step=6",
                "+callbacks.nan.stage=mutual", "+callbacks.nan.model=b")
    assert proc.returncode == 1, proc.stderr[-3000:]
    _clean(proc.stdout + proc.stderr)
    last = run / "phase1_r0.5" / "checkpoints" / "last.ckpt"
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: training diverged in phase 1/2 r=0.5 (A on B's, B on A's labels): the loss of model B is not "
        f"finite (NaN or inf) at step 7; the last good checkpoint is {last} (step 4); rerunning continues from "
        "it (nothing after step 4 was saved). Try a lower learning rate (method.phase.lr=0.001, a tenth of 0.01): "
        f"rerun the command with that change plus hydra.run.dir={run} (else the changed setting names a new run "
        "folder)")
    assert checkpoint_step(last) == 4 and not (run / "results.json").exists()

    rerun = _run(base, run, "method.phase.lr=0.005")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    _clean(log)
    assert f"phase1_r0.5: resuming from {last} (step 4)" in log
    assert "resuming with this command's settings: learning rate 0.01 → 0.005" in log
    import csv

    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-SGD/a/backbone")]
    lr = {int(r["step"]): float(r["lr-SGD/a/backbone"]) for r in rows}
    start = reference["phases"][0]["steps"]  # phase 1's first step on the run's step axis
    assert lr[start + 4] == pytest.approx(0.005 * 0.5**0.9)  # the new rate, the poly factor of step 4 of 8
    assert lr[start + 3] == pytest.approx(0.01 * (5 / 8) ** 0.9)  # before the checkpoint: the old rate
    _assert_same_run(run, reference)


# -- one run per folder ----------------------------------------------------------------------------------
def test_a_second_command_on_a_busy_run_folder_exits_within_seconds_naming_the_holder(base):
    run, release = base / "busy", base / "busy.release"
    holder = _start(base, run, "+callbacks.hold._target_=test_faults.WaitForFile", f"+callbacks.hold.path={release}",
                    log=base / "busy.log", method=("method=supervised",))
    try:
        _wait(lambda: (run / "run.lock").is_file() and (run / "run.lock").stat().st_size > 0, 120, "no lock", holder)
        start = time.monotonic()
        second = _run(base, run, method=("method=supervised",))
        took = time.monotonic() - start
        assert holder.poll() is None  # still holding the folder
    finally:
        release.touch()
        holder.kill()
        holder.wait()
    assert second.returncode == 1
    _clean(second.stdout + second.stderr)
    error = second.stderr.strip().splitlines()
    assert len([line for line in error if line.startswith("error:")]) == 1
    assert error[-1].startswith(f"error: run folder {run} is in use by pid {holder.pid} on host "
                                f"{socket.gethostname()} since "), error[-1]
    assert error[-1].endswith("; wait for that command to finish or stop it, or run in another folder "
                              "(hydra.run.dir=...)")
    assert took < 60 and not (run / "checkpoints").exists()  # stopped before any work


# -- a file that cannot be written -----------------------------------------------------------------------
def _file_size_limit(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_checkpoint_beyond_the_file_size_limit_is_one_error_and_nothing_half_written_stays(base):
    """ulimit -f below a checkpoint's size: one error naming the checkpoint and the fix, no partial or temporary
    file left; the rerun without the limit trains normally."""
    run = base / "fsize"
    proc = _run(base, run, method=("method=supervised",), preexec_fn=_file_size_limit(1_000_000))
    assert proc.returncode == 1
    _clean(proc.stdout + proc.stderr)
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: cannot write {run / 'checkpoints'}/best-step2-"), error
    assert error.endswith(".ckpt: File too large (EFBIG); the file exceeds the file-size limit (ulimit -f, or the "
                          "file system's): raise the limit, then rerun the same command to continue (nothing "
                          "half-written is used)")
    assert not list(run.rglob("*.ckpt")) and not list(run.rglob(".*.tmp")) and not (run / "results.json").exists()
    rerun = _run(base, run, method=("method=supervised",))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 2


STORE_WRITE = """
import numpy as np, sys
from dmtc.dmt.store import PseudoLabelStore
from dmtc.errors import DMTCError
store = PseudoLabelStore(sys.argv[1])
rng = np.random.default_rng(0)
try:
    label = rng.integers(0, 10, (256, 256)).astype(np.uint8)
    store.write("img", label, rng.integers(0, 65535, (256, 256)).astype(np.uint16))
except DMTCError as err:
    print(f"error: {err}")
"""


def test_pseudo_label_store_beyond_the_file_size_limit_names_the_file(tmp_path):
    store = tmp_path / "pseudo_a"
    proc = subprocess.run([sys.executable, "-c", STORE_WRITE, str(store)], capture_output=True, text=True,
                          timeout=120, preexec_fn=_file_size_limit(20_000), env=_env())
    assert proc.stdout.strip() == (f"error: cannot write {store / 'label' / 'img.png'}: File too large (EFBIG); the "
                                   "file exceeds the file-size limit (ulimit -f, or the file system's): raise the "
                                   "limit, then rerun the same command to continue (nothing half-written is used)"), (
        proc.stdout + proc.stderr)
    assert not list(store.rglob("*.png")) and not list(store.rglob(".*.tmp")) and not (store / "manifest.json").exists()


# -- the pieces, in-process ------------------------------------------------------------------------------
class _Unpicklable:
    def __reduce__(self):
        raise OSError(28, "No space left on device")  # as a full disk fails torch.save's write


def _ckpt(step: int) -> dict:
    return {"state_dict": {"w": torch.full((1000,), float(step))}, "global_step": step}


def test_atomic_checkpoint_io_keeps_the_old_file_and_the_previous_generation(tmp_path):
    io = AtomicCheckpointIO()
    last = tmp_path / "ckpts" / "last.ckpt"
    for step in (1, 2, 3):
        io.save_checkpoint(_ckpt(step), last)
    assert checkpoint_step(last) == 3 and checkpoint_step(last.with_name(PREVIOUS)) == 2
    with pytest.raises(OutputError, match="cannot write .*last.ckpt: No space left on device"):
        io.save_checkpoint({**_ckpt(4), "bad": _Unpicklable()}, last)
    assert checkpoint_step(last) == 3  # a failed save leaves the last complete file
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # nothing half-written; prev dropped
    assert io.load_checkpoint(last)["global_step"] == 3
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(Exception, match=f"checkpoint {last} cannot be read"):
        io.load_checkpoint(last)


def test_resume_falls_back_to_the_previous_checkpoint_then_to_the_start(tmp_path, caplog):
    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint(_ckpt(4), last)
    io.save_checkpoint(_ckpt(6), last)
    temp_sibling(last).write_bytes(b"half a checkpoint")  # a save killed mid-write
    assert resume_checkpoint(tmp_path) == last and not list(tmp_path.glob(".*.tmp"))
    last.write_bytes(b"PK\x03\x04 not a whole zip")
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(tmp_path) == tmp_path / PREVIOUS
    assert caplog.text.count("is unreadable") == 1 and "resuming from" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # set aside: not warned about again
        assert resume_checkpoint(tmp_path) == tmp_path / PREVIOUS and "unreadable" not in caplog.text
    (tmp_path / PREVIOUS).write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(tmp_path, what="phase1_r0.5") is None
    assert "phase1_r0.5 starts again from its beginning" in caplog.text


class _Sqrt(L.LightningModule):
    """loss = sqrt(|w|) at w = 0: a finite loss (0) with a NaN gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def training_step(self, batch, batch_idx):
        return self.w.abs().sqrt().sum() + 0 * batch.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(8, 1), batch_size=2)


def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_optimizer_step(tmp_path):
    guard = DivergenceGuard()
    guard.stage = "the test"
    module = _Sqrt()
    trainer = L.Trainer(max_steps=4, callbacks=[guard], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(DivergenceError, match=r"training diverged in the test: the gradient norm of the model is not "
                                              r"finite \(NaN or inf\) at step 1; no checkpoint"):
        trainer.fit(module)
    assert torch.equal(module.w.detach(), torch.zeros(3))  # the NaN step was not applied


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 AMP with a GradScaler needs CUDA")
def test_amp_skipped_steps_are_not_divergence(tmp_path):
    """Under precision=16-mixed a step whose fp16 gradients overflow is skipped by the GradScaler (not
    divergence); a NaN loss still stops the run."""

    class Overflow(_Sqrt):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(1, 4)

        def training_step(self, batch, batch_idx):
            # a finite loss whose gradient overflows fp16 in the autocast matmul's backward at the GradScaler's
            # first scales (65536 · 1e4 > 65504): every step is skipped by the scaler
            return (self.lin(batch).float() * 1e4).sum()

    class NaNLoss(_Sqrt):
        def training_step(self, batch, batch_idx):
            return self.w.sum() * float("nan") + 0 * batch.sum()

    kwargs = {"max_steps": 4, "accelerator": "gpu", "devices": 1, "precision": "16-mixed", "logger": False,
              "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
              "default_root_dir": tmp_path}
    L.Trainer(callbacks=[DivergenceGuard()], **kwargs).fit(Overflow())  # no error
    with pytest.raises(DivergenceError, match="the loss of the model is not finite"):
        L.Trainer(callbacks=[DivergenceGuard()], **kwargs).fit(NaNLoss())
