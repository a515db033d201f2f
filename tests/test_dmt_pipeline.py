"""DMT end to end: two phases through train.py, resume after kill -9, untrusted stores, pseudo_label.py,
the pseudo-labeled dataset's joint transform and the user mistakes that must end in one message."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from conftest import REPO, expect_user_error, run_script, tiny_run_overrides

from dmtc.data.build import build_layout, prepare_dataset
from dmtc.data.split_resolver import resolve_split
from dmtc.data.transforms import build_train_transform
from dmtc.dmt.labeling import label_images, labeling_transform
from dmtc.dmt.phase_data import PseudoLabeledDataset
from dmtc.dmt.scores import decode_score, score_to_confidence
from dmtc.dmt.store import PseudoLabelStore
from dmtc.models import deeplab_v2
from dmtc.tasks.pseudo_label import pseudo_label
from dmtc.tasks.train import train

DMT = ["method=dmt", "method.ratios=[0.5,1.0]", "method.phase.epochs=1"]
DONE_FILE = "done.json"


def _dmt_overrides(tmp: Path) -> list[str]:
    return [*tiny_run_overrides(tmp), *DMT, f"hydra.run.dir={tmp / 'run'}"]


def _popen(tmp: Path, overrides: list[str]) -> subprocess.Popen:
    path = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", PYTHONPATH=path)
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *overrides], cwd=tmp, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_kill_mid_phase_resumes_from_the_phases_last_checkpoint(tmp_path):
    """train.py method=dmt killed (-9) at step 6 of phase 1 (2 epochs of 4 batches; last.ckpt after epoch 1 at
    step 4), rerun: the finished warm-up is not retrained, phase 1 resumes from its step-4 last.ckpt (not from
    the phase start), results.json is complete, global_step == batches per phase and logged steps never go
    back."""
    run = tmp_path / "run"
    overrides = [*_dmt_overrides(tmp_path), "method.phase.epochs=2"]
    killer = ["+callbacks.kill._target_=test_loggers.KillAtStep", "+callbacks.kill.step=6",
              "+callbacks.kill.stage=mutual"]
    proc = _popen(tmp_path, [*overrides, *killer])
    assert proc.wait(timeout=240) == -signal.SIGKILL
    assert not (run / "results.json").exists() and not (run / "phase1_r0.5" / DONE_FILE).exists()
    last = torch.load(run / "phase1_r0.5" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4  # the validation after epoch 1
    warmup_done = run / "phase0_warmup" / DONE_FILE
    mtime = warmup_done.stat().st_mtime_ns
    warmup_ckpts = {p.name: p.stat().st_mtime_ns for p in (run / "phase0_warmup" / "checkpoints").iterdir()}

    rerun = run_script("train.py", overrides, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert "phase0_warmup finished earlier: skipping it" in log
    assert "phase1_r0.5: resuming from" in log and "reusing complete pseudo-label store" in log
    assert warmup_done.stat().st_mtime_ns == mtime
    assert {p.name: p.stat().st_mtime_ns for p in (run / "phase0_warmup" / "checkpoints").iterdir()} == warmup_ckpts

    results = json.loads((run / "results.json").read_text())
    assert [p["name"] for p in results["phases"]] == ["phase0_warmup", "phase1_r0.5", "phase2_r1"]
    assert results["miou"] == max(results["phases"][-1]["val"][k]["miou"] for k in "ab")
    assert Path(results["checkpoint"]).is_file() and set(results["per_class_iou"]) >= {"background"}
    assert all(Path(results["checkpoints"][k]).is_file() for k in "ab")
    for phase in results["phases"]:
        assert set(phase["val"]) == {"a", "b", "ens"}
    # global_step counts batches (one optimizer step for the pair): 5 labeled // batch 2 = 2 warm-up
    # batches; phases: 2 epochs capped at limit_train_batches=4
    assert [p["steps"] for p in results["phases"]] == [2, 8, 8] and results["steps"] == 18
    pseudo = results["phases"][1]["pseudo"]["a"]
    assert pseudo["ratio"] == 0.5 and 0.5 <= pseudo["kept_fraction"] < 0.6
    assert set(pseudo["classes"]["background"]) == {"predicted", "kept", "threshold", "threshold_score"}
    assert "quality" in pseudo and results["phases"][2]["pseudo"]["b"]["kept_fraction"] == 1.0
    assert "DMT synthetic" in rerun.stdout and "warm-up" in rerun.stdout
    # one CSV log across phases and attempts, its step axis never going back, each training step once
    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and max(steps) >= 16
    trained = [int(r["step"]) for r in rows if r.get("train/a/loss")]
    assert len(trained) == len(set(trained))
    # every row names its phase; the end-of-phase re-validation of the best checkpoints is marked, once each
    phases = [int(float(r["phase"])) for r in rows]
    assert phases == sorted(phases) and set(phases) == {0, 1, 2}
    revalidated = [r for r in rows if r.get("best_revalidation")]
    assert [int(r["step"]) for r in revalidated] == [2, 10, 18] and all(r["val/a/miou"] for r in revalidated)
    assert results["reported_phase"] == "phase2_r1" and results["best_phase"]["name"] in {
        p["name"] for p in results["phases"]}
    assert "best phase:" in rerun.stdout


def test_kill_in_a_capped_phase_resumes_to_the_cap(tmp_path):
    """A phase capped by method.phase.max_steps=7 (2 epochs of 4 batches would be 8), killed (-9) at step 6,
    after the end-of-epoch validation's last.ckpt at step 4: the rerun resumes from step 4 and trains on to
    the cap (Lightning given both max_epochs and max_steps would count the resumed epoch twice and stop at
    step 4), and the first phase, which the kill did not touch, also ends at 7."""
    run = tmp_path / "run"
    overrides = [*_dmt_overrides(tmp_path), "method.phase.epochs=2", "method.phase.max_steps=7"]
    killer = ["+callbacks.kill._target_=test_loggers.KillAtStep", "+callbacks.kill.step=6",
              "+callbacks.kill.stage=mutual"]
    proc = _popen(tmp_path, [*overrides, *killer])
    assert proc.wait(timeout=240) == -signal.SIGKILL
    last = torch.load(run / "phase1_r0.5" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4
    rerun = run_script("train.py", overrides, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "phase1_r0.5: resuming from" in rerun.stdout + rerun.stderr
    results = json.loads((run / "results.json").read_text())
    assert [p["steps"] for p in results["phases"]] == [2, 7, 7] and results["steps"] == 16
    assert all(Path(p["checkpoints"][k]).name.startswith(f"best-{k}-") for p in results["phases"] for k in "ab")


def test_kill_during_labeling_reuses_the_finished_store_and_redoes_the_other(tmp_path):
    """Killed while model B labels (A's store finished, B's half written), rerun: A's store is reused as it
    is, B's (no manifest) is cleared and rewritten, and the run completes."""
    run = tmp_path / "run"
    overrides = [*_dmt_overrides(tmp_path), "method.ratios=[1.0]"]
    proc = _popen(tmp_path, overrides)
    store_a, store_b = run / "phase1_r1" / "pseudo_a", run / "phase1_r1" / "pseudo_b"
    try:
        deadline = time.monotonic() + 240
        while not any((store_b / "label").glob("*.png")):  # B's store has started (A's is finalized)
            assert proc.poll() is None, "train.py ended before model B labeled anything"
            assert time.monotonic() < deadline, "labeling by model B never started"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (store_a / "manifest.json").is_file() and not (store_b / "manifest.json").exists()
    a_files = {p: p.stat().st_mtime_ns for p in store_a.rglob("*") if p.is_file()}
    rerun = run_script("train.py", overrides, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert f"reusing complete pseudo-label store {store_a}" in log
    assert f"pseudo-label store {store_b} is incomplete or stale: rewriting it" in log
    assert {p: p.stat().st_mtime_ns for p in store_a.rglob("*") if p.is_file()} == a_files
    assert PseudoLabelStore(store_b).is_complete({"model": "b"})
    assert json.loads((run / "results.json").read_text())["phases"][1]["pseudo"]["b"]["num_images"] == 35


def _tiny_cfg(compose_cfg, *extra: str):
    cfg = compose_cfg(overrides=[*DMT, *extra])
    prepare_dataset(cfg)
    return cfg


def test_interrupted_store_is_not_trusted(compose_cfg, tmp_path):
    cfg = _tiny_cfg(compose_cfg)
    layout = build_layout(cfg)
    names = resolve_split(cfg, layout).unlabeled[:6]
    model = deeplab_v2(10, backbone="resnet_tiny")
    directory = tmp_path / "store"
    kwargs = {"meta": {"source": "x"}, "num_classes": 10, "transform": labeling_transform(cfg), "batch_size": 3}
    store, hist, reused = label_images(model, layout, "train", names, directory, **kwargs)
    assert not reused and sorted(store.names()) == sorted(names) and int(hist.predicted().sum()) == 6 * 64 * 64
    assert label_images(model, layout, "train", names, directory, **kwargs)[2]  # complete: reused

    # killed mid-write: the manifest went first, some files are written -> rewritten, not trusted
    (directory / "manifest.json").unlink()
    store.confidence_path(names[3]).unlink()
    store, _, reused = label_images(model, layout, "train", names, directory, **kwargs)
    assert not reused and store.confidence_path(names[3]).is_file()
    # a manifest from other labels (another source model) is not trusted either
    assert not label_images(model, layout, "train", names, directory, **{**kwargs, "meta": {"source": "y"}})[2]


def test_pseudo_dataset_moves_all_maps_together(compose_cfg, tmp_path):
    cfg = _tiny_cfg(compose_cfg)
    layout = build_layout(cfg)
    names = resolve_split(cfg, layout).unlabeled[:2]
    stores = {}
    rng = np.random.default_rng(0)
    for key in "ab":
        stores[key] = PseudoLabelStore(tmp_path / key)
        for name in names:
            label = rng.integers(0, 10, (64, 64)).astype(np.uint8)
            code = (label.astype(np.uint16) * 6000 + 1000).astype(np.uint16)  # score determined by label
            stores[key].write(name, label, code)
    # thresholds are scores (code · 32/65535): b keeps classes whose score >= 16, i.e. labels >= 6
    thresholds = {"a": [0.0] * 10, "b": [16.0] * 10}
    tf = build_train_transform(crop_size=[48, 48], scale_range=[0.6, 1.7], mean=[0.5] * 3, std=[0.2] * 3)
    ds = PseudoLabeledDataset(layout, "train", names, stores, thresholds, tf)
    for _ in range(4):
        item = ds[0]
        assert item["image"].shape == (3, 48, 48)
        for key in "ab":
            label, conf = item[f"label_{key}"], item[f"conf_{key}"]
            assert label.shape == conf.shape == (48, 48) and label.dtype == torch.int64
            kept = label != 255
            expected = score_to_confidence(decode_score(label[kept] * 6000 + 1000))
            assert torch.equal(conf[kept], expected)  # nearest: each label stays with its confidence
        assert (item["label_b"][item["label_b"] != 255] >= 6).all()


def test_pseudo_label_entry_point(tmp_path):
    path = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save({"model": deeplab_v2(10, backbone="resnet_tiny").state_dict()}, path)
    proc = run_script("pseudo_label.py", [*tiny_run_overrides(tmp_path), f"ckpt={path}", "ratio=0.4",
                                          f"hydra.run.dir={tmp_path / 'pl'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "pl" / "summary.json").read_text())
    assert summary["ratio"] == 0.4 and summary["num_images"] == 35
    assert PseudoLabelStore(summary["store"]).is_complete({})
    classes = summary["classes"]
    assert set(classes) >= {"background", "striped_bar"}
    assert sum(c["predicted"] for c in classes.values()) == 35 * 64 * 64
    for c in classes.values():
        assert c["kept"] <= c["predicted"]
    assert 0 <= summary["quality"]["miou"] <= 100 and set(summary["quality"]["precision"]) == set(classes)




def test_pseudo_label_checkpoint_with_other_class_count(compose_cfg, capsys, tmp_path):
    path = tmp_path / "five.pt"
    torch.save({"model": deeplab_v2(5, backbone="resnet_tiny").state_dict()}, path)
    cfg = compose_cfg("pseudo_label", overrides=[f"ckpt={path}"])
    expect_user_error(pseudo_label, cfg, capsys, "five.pt")


def test_missing_unlabeled_list(compose_cfg, capsys, tmp_path):
    cfg = compose_cfg(overrides=[*DMT, "dataset.split_lists={labeled:mine_l.txt,unlabeled:mine_u.txt}"])
    prepare_dataset(cfg)
    root = Path(cfg.dataset.root)
    (root / "mine_l.txt").write_text("train_00000\ntrain_00001\n")
    expect_user_error(train, cfg, capsys, "mine_u.txt")


def test_split_without_unlabeled_images(compose_cfg, capsys):
    cfg = compose_cfg(overrides=[*DMT, "split=1"])
    expect_user_error(train, cfg, capsys, "split=1", "unlabeled")
