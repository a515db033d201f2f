"""Many devices train the same protocol as one (dmtc.data.sharding): global batches, the same steps, every
val image counted once; DDP inside a Hydra multirun runs each job once. CPU DDP (gloo), real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LEARNABLE, REPO, run_script, tiny_run_overrides

from dmtc.data.sharding import EvalShardSampler, device_batch, train_sampler
from dmtc.errors import DMTCError

PROBE = "+callbacks.probe._target_=probes.TrainerProbe"
DDP2 = ["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def _train(tmp: Path, args: list[str], flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(REPO / "train.py"), *flags, *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=400)


def _probes(out: Path) -> dict[tuple[int, int], dict]:
    """``{(rank, fit): record}`` written by tests/probes.py."""
    records = {}
    for path in out.glob("rank*_fit*.json"):
        rank, fit = path.stem.removeprefix("rank").split("_fit")
        records[int(rank), int(fit)] = json.loads(path.read_text())
    return records


def test_device_batch_splits_the_global_batch_or_names_the_key():
    assert device_batch(8, 1, "dataset.batch_size") == 8 and device_batch(8, 4, "dataset.batch_size") == 2
    with pytest.raises(DMTCError, match=r"dataset.batch_size=6 is the global batch .* 4 processes"):
        device_batch(6, 4, "dataset.batch_size")


@pytest.mark.parametrize("n,world", [(7, 2), (10, 3), (2, 4)])
def test_eval_shards_hold_every_image_exactly_once(n, world):
    data = list(range(n))
    shards = [list(EvalShardSampler(data, world, r)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == data
    assert [len(EvalShardSampler(data, world, r)) for r in range(world)] == [len(s) for s in shards]


@pytest.mark.parametrize("n,batch,world", [(11, 4, 2), (372, 8, 4), (37, 6, 3), (5, 2, 2)])
def test_training_shards_give_the_one_device_step_count(n, batch, world):
    """⌊⌊n/w⌋/(b/w)⌋ = ⌊n/b⌋: with drop_last shards, w processes step as often as one."""
    data = list(range(n))
    per_device = device_batch(batch, world, "b")
    steps = {len(train_sampler(data, world, r)) // per_device for r in range(world)}
    assert steps == {n // batch}
    assert train_sampler(data, 1, 0) is None  # one process: the loader shuffles as before


def test_two_process_validation_equals_one_process_evaluation(tmp_path):
    """An odd-sized val set (7 images) on 2 processes: no padded duplicates, so the mIoU of the best checkpoint
    as DDP training re-validates it equals evaluate.py's on one process."""
    overrides = [*tiny_run_overrides(tmp_path, synthetic=False), *LEARNABLE, "split=1",
                 "dataset.generate.spec.num_val=7", "dataset.val_batch_size=1"]
    run = tmp_path / "ddp"
    proc = _train(tmp_path, [*overrides, *DDP2, f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dataset.batch_size=8 is the global batch: 4 per device on 2 processes" in proc.stdout + proc.stderr
    trained = json.loads((run / "results.json").read_text())
    assert trained["num_val"] == 7 and sum(1 for v in trained["per_class_iou"].values() if v) >= 2
    proc = run_script("evaluate.py", [*overrides, f"ckpt={trained['checkpoint']}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp_path / "outputs" / "evaluate").rglob("results.json")
    evaluated = json.loads(path.read_text())
    assert evaluated["miou"] == pytest.approx(trained["miou"], abs=1e-6)
    assert evaluated["per_class_iou"] == pytest.approx(trained["per_class_iou"], abs=1e-6)


def test_one_and_two_devices_run_the_same_protocol(tmp_path):
    """A DMT smoke run on 1 and on 2 processes: the same steps per epoch and per fit (warm-up and phases),
    the same phases, and each process loads half of every global batch."""
    figures = {}
    for devices in (1, 2):
        out, run = tmp_path / f"probe{devices}", tmp_path / f"run{devices}"
        args = [*tiny_run_overrides(tmp_path), "method=dmt", "dataset.batch_size=4",
                "method.phase.labeled_batch_size=2", "method.phase.unlabeled_batch_size=4", PROBE,
                f"+callbacks.probe.out={out}", f"hydra.run.dir={run}"]
        if devices == 2:
            args += DDP2
        proc = _train(tmp_path, args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads((run / "results.json").read_text())
        figures[devices] = (_probes(out), results)
    one, two = figures[1][0], figures[2][0]
    assert sorted(one) == [(0, f) for f in range(3)] and sorted(two) == [(r, f) for r in (0, 1) for f in range(3)]
    for fit in range(3):
        for rank in (0, 1):
            for key in ("num_training_batches", "estimated_stepping_batches", "stage"):
                assert two[rank, fit][key] == one[0, fit][key], (fit, rank, key)
            assert two[rank, fit]["world_size"] == 2
            assert {k: 2 * v for k, v in two[rank, fit]["device_batches"].items()} == one[0, fit]["device_batches"]
    steps = [[p["steps"] for p in figures[d][1]["phases"]] for d in (1, 2)]
    assert steps[0] == steps[1] and figures[1][1]["steps"] == figures[2][1]["steps"]


def test_ddp_inside_a_multirun_runs_each_job_once(tmp_path):
    """``-m sid=0,1`` with 2-process DDP: one sweep folder, two finished jobs, each trained by ranks 0 and 1
    (Lightning's DDP children used to receive the whole sweep again)."""
    out = tmp_path / "probe"
    args = [*tiny_run_overrides(tmp_path), "sid=0,1", *DDP2, PROBE, f"+callbacks.probe.out={out}" + "/${sid}"]
    proc = _train(tmp_path, args, flags=("--multirun",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "train" / "multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 2 and all((j / "results.json").is_file() for j in jobs)
    assert proc.stdout.count("Launching 2 jobs") + proc.stderr.count("Launching 2 jobs") == 1
    for sid in (0, 1):
        assert sorted(_probes(out / str(sid))) == [(0, 0), (1, 0)]


def test_sync_batchnorm_auto_needs_several_gpus(compose_cfg):
    from dmtc.trainer import sync_batchnorm

    cfg = compose_cfg(overrides=[*DDP2])
    assert sync_batchnorm(cfg.trainer) is False  # CPU: torch has no SyncBatchNorm there
    cfg.trainer.sync_batchnorm = True
    assert sync_batchnorm(cfg.trainer) is True
    if torch.cuda.device_count() > 1:  # pragma: no cover (CI has no GPU)
        assert sync_batchnorm(compose_cfg(overrides=["strategy=ddp", "trainer.devices=2"]).trainer) is True
