"""evaluate.py / pseudo_label.py rebuild the model from the checkpoint (dmtc.from_checkpoint): dmtc checkpoints
carry architecture, input pipeline and dataset settings; DMT/DMTC release files are the released two-branch
model; flags that contradict a dmtc checkpoint are one error; every checkpoint gets its own output folder."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import expect_user_error, run_script, tiny_run_overrides
from test_cityscapes import city_overrides, make_city_tree

from dmtc.dmt.mutual import MutualTrainingModule
from dmtc.from_checkpoint import restore
from dmtc.models import deeplab_v2
from dmtc.tasks.evaluate import evaluate
from dmtc.tasks.pseudo_label import pseudo_label
from dmtc.tasks.train import train


def _release_file(path: Path, num_classes: int = 19) -> Path:
    """A DMT-format file ({'model': ...}, classifier.0.convs.*) holding four strong, different ASPP convs,
    so summing two or four branches predicts differently."""
    torch.manual_seed(0)
    model = deeplab_v2(num_classes, backbone="resnet_tiny")
    for conv in model.classifier.convs:
        torch.nn.init.normal_(conv.weight, std=0.5)
        torch.nn.init.normal_(conv.bias, std=0.5)
    state = {k.replace("classifier.convs.", "classifier.0.convs."): v for k, v in model.state_dict().items()}
    torch.save({"model": state, "optimizer": {}, "lr_scheduler": {}}, path)
    return path


def _exports(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(folder.glob("*.png"))}


def test_release_file_evaluates_as_the_released_model(compose_cfg, tmp_path):
    root = make_city_tree(tmp_path / "cityscapes")
    ckpt = _release_file(tmp_path / "dmt_city.pt")

    def run(name: str, *extra: str) -> tuple[dict, dict[str, np.ndarray]]:
        out = tmp_path / name
        cfg = compose_cfg("evaluate", overrides=city_overrides(root, f"ckpt={ckpt}", "eval.protocol=full",
                                                               f"eval.export_dir={out}", *extra))
        return evaluate(cfg), _exports(out)

    plain, plain_png = run("plain")  # no flags: not even the backbone
    assert plain["model"]["backbone"] == "resnet_tiny" and plain["model"]["aspp_dilations"] == [6, 12]
    assert plain["model"]["align_corners"] is True and plain["model"]["checkpoint_kind"] == "release"
    two, two_png = run("two", "model.aspp_dilations=[6,12]")
    four, four_png = run("four", "model.aspp_dilations=[6,12,18,24]")
    assert len(plain_png) == 4 and all(np.array_equal(plain_png[k], two_png[k]) for k in plain_png)
    assert two["miou"] == plain["miou"]
    assert any(not np.array_equal(plain_png[k], four_png[k]) for k in plain_png)  # the flag is obeyed
    # the released model is d6 + d12 on the file's tensors, upsampled with align_corners=True
    model = deeplab_v2(19, backbone="resnet_tiny", aspp_dilations=(6, 12), align_corners=True).eval()
    state = torch.load(ckpt, weights_only=True)["model"]
    model.load_state_dict({k.replace("classifier.0.convs.", "classifier.convs."): v for k, v in state.items()
                           if not k.startswith(("classifier.0.convs.2", "classifier.0.convs.3"))})
    restored = restore(compose_cfg("evaluate", overrides=city_overrides(root, f"ckpt={ckpt}")), ckpt).model.eval()
    images = torch.randn(1, 3, 16, 32)
    with torch.no_grad():
        assert torch.equal(model(images)["logits"], restored(images)["logits"])


def _train_pair(compose_cfg, *extra: str) -> dict:
    return train(compose_cfg(overrides=["method=dmtc", "method.ratios=[1.0]", "method.phase.epochs=1",
                                        "trainer.limit_val_batches=null", *extra]))


def test_dmtc_checkpoint_evaluates_and_labels_without_flags(compose_cfg, tmp_path):
    results = _train_pair(compose_cfg, "model.align_corners=true", "model.aspp_dilations=[6,12]")
    ckpt_b = Path(results["checkpoints"]["b"])
    stored = torch.load(ckpt_b, map_location="cpu", weights_only=True)["dmtc"]
    assert stored["models"]["a"]["aspp_dilations"] == [6, 12] and stored["models"]["b"]["align_corners"] is True
    assert stored["models"]["a"]["projection_dim"] == 150 and stored["dataset"]["name"] == "synthetic"
    assert stored["split"] == "8" and Path(stored["dataset"]["root"]).is_absolute()
    # evaluate.py on a config that says otherwise everywhere (the default synthetic 4-branch, align False,
    # another dataset root) reproduces the run's recorded mIoU of B from the file alone
    cfg = compose_cfg("evaluate", overrides=[f"ckpt={ckpt_b}", "model_key=b", "dataset.val_batch_size=3"])
    evaluated = evaluate(cfg)
    assert evaluated["miou"] == pytest.approx(results["phases"][-1]["val"]["b"]["miou"], abs=1e-3)
    assert evaluated["model"]["aspp_dilations"] == [6, 12] and evaluated["model"]["align_corners"] is True
    assert evaluated["model_key"] == "b" and evaluated["eval"]["input_init"] == "none"
    # a second checkpoint with the same overrides gets its own folder (no results.json overwritten)
    cfg_a = compose_cfg("evaluate", overrides=[f"ckpt={results['checkpoints']['a']}", "model_key=b"])
    assert cfg_a.hydra.run.dir != cfg.hydra.run.dir and Path(results["checkpoints"]["a"]).stem in cfg_a.hydra.run.dir
    # pseudo_label.py labels the run's own unlabeled split with the checkpoint's model
    summary = pseudo_label(compose_cfg("pseudo_label", overrides=[f"ckpt={ckpt_b}", "model_key=b", "ratio=0.5"]))
    assert summary["num_images"] == results["num_unlabeled"] and 0.5 <= summary["kept_fraction"] < 0.55


def test_flags_that_contradict_the_checkpoint_are_one_error(compose_cfg, capsys):
    results = _train_pair(compose_cfg)
    ckpt = results["checkpoints"]["a"]
    for flag, fragment in (("model.aspp_dilations=[6,12]", "model.aspp_dilations"),
                           ("backbone=resnet18", "backbone=resnet18"),
                           ("backbone.init=coco", "backbone.init=coco"),
                           ("model.align_corners=true", "model.align_corners")):
        cfg = compose_cfg("evaluate", overrides=[f"ckpt={ckpt}", flag])
        expect_user_error(evaluate, cfg, capsys, fragment, "the checkpoint's", str(ckpt))
    # a dataset with another class count
    cfg = compose_cfg("evaluate", overrides=[f"ckpt={ckpt}", "dataset=city", "dataset.root=/nonexistent"])
    expect_user_error(evaluate, cfg, capsys, "10 classes", "19")


def test_pair_inits_give_each_model_its_input_pipeline(tmp_path, compose_cfg):
    """A pair checkpoint with A from COCO (Caffe BGR 0–255) and B from ImageNet: model_key picks the model and
    its own normalisation (written by the module's on_save_checkpoint, as the Trainer calls it)."""
    from dmtc.models.inits import INIT_INPUTS

    models = {k: deeplab_v2(10, backbone="resnet_tiny") for k in "ab"}
    models["a"].inputs = {"init": "coco", **INIT_INPUTS["coco"]}
    models["b"].inputs = {"init": "imagenet", **INIT_INPUTS["imagenet"]}
    module = MutualTrainingModule(models, num_classes=10, class_names=[str(i) for i in range(10)], lr=0.1,
                                  run_record={"dataset": {"name": "synthetic"}, "split": "8", "sid": 0})
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path / "pair.ckpt"
    torch.save(checkpoint, path)
    cfg = compose_cfg("evaluate", overrides=[f"ckpt={path}"])
    a, b = restore(cfg, path, "a"), restore(cfg, path, "b")
    assert (a.init, a.inputs["bgr"], a.inputs["value_scale"]) == ("coco", True, 1.0)
    assert (b.init, b.inputs["bgr"]) == ("imagenet", False) and b.inputs["std"] == INIT_INPUTS["imagenet"]["std"]
    assert torch.equal(b.model.backbone.conv1.weight, models["b"].backbone.conv1.weight)
    assert not torch.equal(a.model.backbone.conv1.weight, models["b"].backbone.conv1.weight)


def _folder_tree(root: Path, *, unlabeled: int = 0, n: int = 12, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for subset, count in (("train", n), ("val", 4), ("unlabeled", unlabeled)):
        if not count:
            continue
        (root / "images" / subset).mkdir(parents=True)
        if subset != "unlabeled":
            (root / "labels" / subset).mkdir(parents=True)
        for i in range(count):
            image = rng.integers(0, 255, (size, size, 3), np.uint8)
            cv2.imwrite(str(root / "images" / subset / f"img_{i}.png"), image)
            if subset != "unlabeled":
                label = np.zeros((size, size), np.uint8)
                label[:, size // 2:] = 1 + i % 2
                cv2.imwrite(str(root / "labels" / subset / f"img_{i}.png"), label)
    return root


FOLDER = ["dataset=folder", "dataset.num_classes=3", "dataset.class_names=[bg,left,right]",
          "dataset.crop_size=[32,32]", "dataset.val_batch_size=2"]


def test_folder_run_evaluates_with_its_dataset_from_the_checkpoint(tmp_path):
    """A user of dataset=folder does not retype the dataset: evaluate.py ckpt=X alone finds root, classes
    and names in the checkpoint (through the real entry points)."""
    root = _folder_tree(tmp_path / "mine")
    train_args = [*tiny_run_overrides(tmp_path, synthetic=False), *FOLDER, f"dataset.root={root}", "split=1"]
    proc = run_script("train.py", train_args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (tmp_path / "outputs" / "train").rglob("results.json")
    trained = json.loads(results_file.read_text())
    proc = run_script("evaluate.py", [f"ckpt={trained['checkpoint']}", f"paths.log_dir={tmp_path / 'outputs'}"],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (evaluated_file,) = (tmp_path / "outputs" / "evaluate").rglob("results.json")
    evaluated = json.loads(evaluated_file.read_text())
    assert evaluated["dataset"] == "folder" and set(evaluated["per_class_iou"]) == {"bg", "left", "right"}
    assert evaluated["num_val"] == 4 and "recorded in" in evaluated["dataset_settings"]


def test_city_smoke_checkpoint_evaluates_under_the_full_config(compose_cfg, tmp_path):
    """evaluate.py dataset=city ckpt=<a debug=smoke checkpoint> without debug=smoke (so the config says
    resnet101): the checkpoint's resnet_tiny is rebuilt, not refused."""
    root = make_city_tree(tmp_path / "cityscapes")
    results = train(compose_cfg(overrides=city_overrides(root, "method=dmt", "method.ratios=[1.0]",
                                                         "trainer.limit_val_batches=null")))
    ckpt = results["checkpoints"]["a"]
    # dataset=city on the command line: the city config, not the smoke run's record (smoke evaluated at the
    # stored size, hence dataset.eval_size=null to compare with the run's own validation)
    cfg = compose_cfg("evaluate", overrides=city_overrides(root, "~debug", f"ckpt={ckpt}", "dataset.eval_size=null"))
    assert cfg.backbone.name == "resnet101"
    evaluated = evaluate(cfg)
    assert evaluated["model"]["backbone"] == "resnet_tiny" and evaluated["num_val"] == 4
    assert evaluated["miou"] == pytest.approx(results["phases"][-1]["val"]["a"]["miou"], abs=1e-3)
