"""The reference protocol by default on city/voc (issue: fidelity): the released DMT/DMTC model (d6 + d12,
PyTorch's default head init), logits upsampled with align_corners=True in training, labeling and
evaluation, from one place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dmtc.inference import predict_probs
from dmtc.models import deeplab_v2, upsample_logits
from dmtc.models.inits import build_model
from dmtc.module import SegmentationModule


@pytest.mark.parametrize("dataset, dilations, head_init, corners", [
    ("city", (6, 12), "pytorch", True),
    ("voc", (6, 12), "pytorch", True),
    (None, (6, 12, 18, 24), "normal", False),  # synthetic: DeepLab's head, our upsampling
])
def test_protocol_selects_the_model(compose_cfg, dataset, dilations, head_init, corners):
    overrides = [f"dataset={dataset}", "debug=smoke"] if dataset else []
    cfg = compose_cfg("train", overrides)
    model = build_model(cfg)
    assert model.aspp_dilations == dilations and len(model.classifier.convs) == len(dilations)
    assert model.head_init == head_init and model.align_corners is corners


def test_overrides_select_the_other_side(compose_cfg):
    cfg = compose_cfg("train", ["dataset=city", "debug=smoke", "model.aspp_dilations=[6,12,18,24]",
                                "model.head_init=normal", "model.align_corners=false"])
    model = build_model(cfg)
    assert model.aspp_dilations == (6, 12, 18, 24) and model.head_init == "normal" and not model.align_corners


def test_head_init_normal_vs_pytorch_default():
    torch.manual_seed(0)
    normal = deeplab_v2(19, backbone="resnet_tiny", aspp_dilations=(6, 12))
    pytorch = deeplab_v2(19, backbone="resnet_tiny", aspp_dilations=(6, 12), head_init="pytorch")
    for conv in normal.classifier.convs:
        assert torch.all(conv.bias == 0) and abs(float(conv.weight.std()) - 0.01) < 0.002
    fan_in = pytorch.classifier.convs[0].weight[0].numel()
    bound = 1 / fan_in**0.5  # nn.Conv2d's default: kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(fan_in), ...)
    for conv in pytorch.classifier.convs:
        assert conv.bias.abs().max() <= bound and conv.bias.abs().max() > 0
        assert conv.weight.abs().max() <= bound and float(conv.weight.std()) > 0.5 * bound / 3**0.5
    # the Python API keeps its defaults: DeepLab's 4 branches, N(0, 0.01), align_corners False
    default = deeplab_v2(5, backbone="resnet_tiny")
    assert default.aspp_dilations == (6, 12, 18, 24) and default.head_init == "normal" and not default.align_corners


def _logits(model, x):
    return model(x)["logits"]


@pytest.mark.parametrize("corners", [True, False])
def test_every_path_upsamples_as_the_model_says(corners):
    torch.manual_seed(0)
    model = deeplab_v2(4, backbone="resnet_tiny", aspp_dilations=(6, 12), align_corners=corners).eval()
    images = torch.randn(2, 3, 41, 49)
    labels = torch.randint(0, 4, (2, 41, 49))
    with torch.no_grad():
        small = _logits(model, images)
    expected = F.interpolate(small, size=(41, 49), mode="bilinear", align_corners=corners)
    other = F.interpolate(small, size=(41, 49), mode="bilinear", align_corners=not corners)
    assert not torch.allclose(expected, other, atol=1e-4)
    assert torch.equal(upsample_logits(small, (41, 49), align_corners=corners), expected)
    # evaluation
    probs = predict_probs(model, images, (41, 49))
    assert torch.allclose(probs, expected.softmax(1), atol=1e-6)
    # validation inside training: the module's confusion matrix is that of the expected argmax
    module = SegmentationModule({"a": model}, num_classes=4, class_names=list("abcd"), lr=0.01)
    module.eval()
    with torch.no_grad():
        module.validation_step({"image": images, "label": labels}, 0)
    confmat = module.val_metrics["a"].confmat
    ref = torch.bincount(labels.flatten() * 4 + expected.argmax(1).flatten(), minlength=16).view(4, 4)
    assert torch.equal(confmat.cpu(), ref)


@pytest.mark.parametrize("corners", [True, False])
def test_training_and_labeling_upsample_as_the_model_says(tmp_path, corners):
    from dmtc.dmt.curriculum import ConfidenceHistogram
    from dmtc.dmt.labeling import predict_to_store
    from dmtc.dmt.store import PseudoLabelStore

    torch.manual_seed(1)
    model = deeplab_v2(4, backbone="resnet_tiny", aspp_dilations=(6, 12), align_corners=corners)
    images = torch.randn(2, 3, 41, 49)
    labels = torch.randint(0, 4, (2, 41, 49))
    model.eval()  # fixed BN statistics: the same logits in both calls
    with torch.no_grad():
        small = _logits(model, images)
    up = F.interpolate(small, size=(41, 49), mode="bilinear", align_corners=corners)
    module = SegmentationModule({"a": model}, num_classes=4, class_names=list("abcd"), lr=0.01)
    with torch.no_grad():
        loss = module.training_step({"image": images, "label": labels}, 0)
    assert torch.allclose(loss, F.cross_entropy(up, labels), atol=1e-6)
    assert not torch.allclose(loss, F.cross_entropy(
        F.interpolate(small, size=(41, 49), mode="bilinear", align_corners=not corners), labels), atol=1e-6)
    store = PseudoLabelStore(tmp_path / "store")
    batch = {"image": images, "name": ["x", "y"]}
    predict_to_store(model, [batch], store, ConfidenceHistogram(4), "cpu")
    label_x, _ = store.load("x")
    assert (torch.from_numpy(label_x.astype("int64")) == up[0].argmax(0)).float().mean() > 0.999


@pytest.mark.parametrize("dataset, split, warmup_every, phase_every", [
    ("city", "8", 350, 300), ("city", "30", 100, 300), ("city", "4", 500, 300),
    ("voc", "20", 220, 500), ("voc", "106", 100, 500), ("voc", "8", 350, 500), ("voc", "50", 140, 500),
    ("voc", "sbd", 350, 500),
])
def test_validation_intervals_of_dmts_scripts(dataset, split, warmup_every, phase_every):
    # DST-CBC's fs_*_all.sh / dmt-*.sh: --val-num-steps of the warm-up; phases 300 (City) or main.py's 500
    from conftest import CONFIGS
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"dataset={dataset}", f"split={split}", "method=dmt"])
    assert cfg.trainer.val_check_interval == warmup_every and cfg.trainer.check_val_every_n_epoch is None
    assert cfg.method.phase.val_check_interval == phase_every


def test_phase_validates_every_n_steps_and_after_the_last(compose_cfg):
    import csv
    import json

    from dmtc.tasks.train import train

    # 35 unlabeled images, 6 per batch: 5 batches per epoch, 2 epochs = 10 steps; every 4 steps + the last
    cfg = compose_cfg("train", ["method=dmt", "method.ratios=[0.5]", "method.phase.epochs=2",
                                "method.phase.val_check_interval=4", "trainer.limit_train_batches=null"])
    results = train(cfg)
    phase = results["phases"][1]
    assert phase["steps"] == 10
    run = cfg.paths.output_dir
    with open(f"{run}/csv/metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/a/miou")]
    start = json.load(open(f"{run}/phase1_r0.5/done.json"))["step_start"]
    steps = sorted({int(r["step"]) - start for r in rows if int(r["step"]) > start})
    # Lightning logs a validation inside fit at global_step - 1: steps 4 and 8, then the last step (10, off
    # the grid), then the phase's re-validation of its best checkpoints at its end
    assert steps == [3, 7, 9, 10], steps


def test_black_padding_and_plain_bilinear_as_the_reference():
    from torchvision import tv_tensors

    from dmtc.data.transforms import build_train_transform, pad_values
    from dmtc.inference import pad_bottom_right

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    image = tv_tensors.Image(torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8))
    label = tv_tensors.Mask(torch.zeros(20, 30, dtype=torch.uint8))
    common = {"crop_size": [40, 50], "scale_range": [1.0, 1.0], "mean": mean, "std": std, "flip": False}
    for fill, expected in (("mean", [0.0, 0.0, 0.0]), ("black", [-m / s for m, s in zip(mean, std)])):
        torch.manual_seed(0)
        out, lab = build_train_transform(pad_fill=fill, **common)(image, label)
        padded = lab == 255
        assert padded.sum() == 40 * 50 - 20 * 30
        for c in range(3):
            assert torch.allclose(out[c][padded], torch.tensor(expected[c]), atol=1e-6)
        assert pad_values(mean, std, fill) == pytest.approx(expected)
        # the image part is normalised the same either way
        torch.manual_seed(0)
        ref, _ = build_train_transform(pad_fill="mean", **common)(image, label)
        assert torch.allclose(out[:, ~padded], ref[:, ~padded], atol=1e-6)
    # evaluation padding per channel (VOC's 505x505 under the reference: raw black)
    x = torch.randn(1, 3, 4, 5)
    padded = pad_bottom_right(x, (6, 7), [1.0, 2.0, 3.0])
    assert torch.equal(padded[..., :4, :5], x) and torch.all(padded[0, 2, 4:] == 3.0)
    # plain bilinear vs antialiased downscaling differ
    big = {**common, "crop_size": [10, 15], "base_size": [10, 15]}
    plain, _ = build_train_transform(antialias=False, **big)(image, label)
    smooth, _ = build_train_transform(antialias=True, **big)(image, label)
    assert plain.shape == smooth.shape and not torch.allclose(plain, smooth, atol=1e-3)


@pytest.mark.parametrize("dataset, antialias, fill", [("city", False, "black"), ("voc", False, "black"),
                                                      (None, True, "mean")])
def test_protocols_select_padding_and_resizing(compose_cfg, dataset, antialias, fill):
    from dmtc.data.build import pad_fill, resize_options

    cfg = compose_cfg("train", [f"dataset={dataset}"] if dataset else [])
    assert resize_options(cfg) == {"antialias": antialias} and pad_fill(cfg) == fill
