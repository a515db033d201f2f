"""End to end through the real Hydra entry points, and the user mistakes that must end in one message."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import LEARNABLE, expect_user_error, run_script, tiny_run_overrides

from dmtc.models import deeplab_v2
from dmtc.tasks.evaluate import evaluate
from dmtc.tasks.train import train


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_train_then_evaluate_entry_points(tmp_path):
    # the learnable task: a model that predicts several classes, so train-vs-evaluate equality means something
    overrides = [*tiny_run_overrides(tmp_path, synthetic=False), *LEARNABLE, "split=1"]
    proc = run_script("train.py", overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = list((tmp_path / "outputs" / "train").iterdir())
    assert len(run_dirs) == 1
    trained = _results(run_dirs[0])
    assert sum(1 for v in trained["per_class_iou"].values() if v) >= 2
    assert set(trained["per_class_iou"]) >= {"background"}
    ckpt = Path(trained["checkpoint"])
    assert ckpt.is_file() and ckpt.parent == run_dirs[0] / "checkpoints"
    assert (run_dirs[0] / "checkpoints" / "last.ckpt").is_file()
    assert (run_dirs[0] / "csv" / "metrics.csv").is_file()
    assert "mIoU" in proc.stdout

    proc = run_script("evaluate.py", [*overrides, f"ckpt={ckpt}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one folder per checkpoint (stem + path hash), then the overrides
    (results_file,) = list((tmp_path / "outputs" / "evaluate").rglob("results.json"))
    eval_dir = results_file.parent
    assert eval_dir.parent.name.startswith(ckpt.stem + "-")
    evaluated = _results(eval_dir)
    # same weights, same validation batches → the same numbers
    assert evaluated["miou"] == pytest.approx(trained["miou"], abs=1e-3)
    assert evaluated["per_class_iou"] == pytest.approx(trained["per_class_iou"], abs=1e-3)

    # rerunning the same command finds the finished run instead of training again
    proc = run_script("train.py", overrides, cwd=tmp_path)
    assert proc.returncode == 0 and "run is finished" in proc.stdout + proc.stderr
    assert _results(run_dirs[0])["wall_time_s"] == trained["wall_time_s"]

    # overwrite=true retrains from scratch in the same folder: no resume from last.ckpt, no stale files
    (run_dirs[0] / "checkpoints" / "stale-from-an-earlier-run.ckpt").write_bytes(b"")
    before = (run_dirs[0] / "results.json").stat().st_mtime_ns
    proc = run_script("train.py", [*overrides, "overwrite=true"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" not in proc.stdout + proc.stderr
    retrained = _results(run_dirs[0])
    assert retrained["steps"] == trained["steps"] and (run_dirs[0] / "results.json").stat().st_mtime_ns != before
    assert not (run_dirs[0] / "checkpoints" / "stale-from-an-earlier-run.ckpt").exists()


def test_unknown_dataset_is_one_hydra_message(tmp_path):
    proc = run_script("train.py", ["dataset=cityscapez"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "dataset/cityscapez" in proc.stderr and "Traceback" not in proc.stderr




def test_missing_dataset_root(compose_cfg, capsys, tmp_path):
    root = tmp_path / "no_such_data"
    cfg = compose_cfg(overrides=["dataset=folder", f"dataset.root={root}", "dataset.num_classes=3",
                                 "dataset.class_names=[a,b,c]"])
    expect_user_error(train, cfg, capsys, str(root), "dataset.root")


def test_missing_listed_file_is_named_before_training(compose_cfg, capsys, tmp_path):
    root = _folder_dataset(tmp_path / "mine")
    (root / "labels" / "train" / "img_3.png").unlink()
    cfg = compose_cfg(overrides=["dataset=folder", f"dataset.root={root}", "dataset.num_classes=3",
                                 "dataset.class_names=[a,b,c]", "split=1"])
    expect_user_error(train, cfg, capsys, "img_3.png")


def test_corrupt_image_in_a_worker_is_one_message(compose_cfg, capsys, tmp_path):
    root = _folder_dataset(tmp_path / "mine")
    (root / "images" / "train" / "img_2.png").write_bytes(b"not a png")
    cfg = compose_cfg(overrides=["dataset=folder", f"dataset.root={root}", "dataset.num_classes=3",
                                 "dataset.class_names=[a,b,c]", "split=1", "dataset.num_workers=1",
                                 "dataset.batch_size=8"])
    expect_user_error(train, cfg, capsys, "img_2.png", "corrupt")


def test_checkpoint_with_other_class_count(compose_cfg, capsys, tmp_path):
    path = tmp_path / "five_classes.pt"
    torch.save({"model": deeplab_v2(5, backbone="resnet_tiny").state_dict()}, path)
    cfg = compose_cfg("evaluate", overrides=[f"ckpt={path}"])
    expect_user_error(evaluate, cfg, capsys, "5", "10", str(path.name))


def test_missing_checkpoint(compose_cfg, capsys, tmp_path):
    cfg = compose_cfg("evaluate", overrides=[f"ckpt={tmp_path / 'nope.ckpt'}"])
    expect_user_error(evaluate, cfg, capsys, "nope.ckpt", "does not exist")


def test_missing_pretrained_weights_name_file_and_origin(compose_cfg, capsys, tmp_path):
    cfg = compose_cfg(overrides=["backbone=resnet18", "backbone.init=imagenet",
                                 f"paths.weights_dir={tmp_path / 'w'}"])
    expect_user_error(train, cfg, capsys, "resnet18-f37072fd.pth", "download.pytorch.org")


def _folder_dataset(root: Path, n: int = 8, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for subset in ("train", "val"):
        (root / "images" / subset).mkdir(parents=True)
        (root / "labels" / subset).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / "images" / subset / f"img_{i}.png"), rng.integers(0, 255, (size, size, 3), np.uint8))
            cv2.imwrite(str(root / "labels" / subset / f"img_{i}.png"), rng.integers(0, 3, (size, size), np.uint8))
    return root


def test_last_checkpoint_follows_every_validation(compose_cfg):
    """last.ckpt (where a rerun resumes) is rewritten at every validation, also when mIoU does not improve:
    Lightning's save_last only refreshes it together with a new best checkpoint."""
    cfg = compose_cfg(overrides=["optim.lr=0", "trainer.max_epochs=3", "trainer.limit_train_batches=2"])
    results = train(cfg)
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert results["steps"] == last["global_step"] == 6 and last["epoch"] == 2
    (best,) = [p for p in ckpts.iterdir() if p.name.startswith("best-")]
    # lr 0 (only BatchNorm statistics move): the last validation did not improve on the best, so
    # Lightning's save_last would have left last.ckpt at the best's step
    assert "step6-" not in best.name and results["checkpoint"] == str(best)
