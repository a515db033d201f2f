"""Backbone initialisations (none / imagenet / coco) and the input pipeline that follows them (DESIGN §3).

Weight files are written here: the COCO DeepLab-v2 layouts (Hung et al.'s original keys, optionally under
``Scale.``, and DMT's converted ``{'model': ...}`` file) are checked on small models, plus one real
ResNet-101 load through ``build_model`` with ``backbone.init=coco``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import expect_user_error
from torchvision import tv_tensors

from dmtc.data.transforms import build_eval_transform
from dmtc.errors import DMTCError
from dmtc.models import deeplab_v2
from dmtc.models.checkpoints import COCO_INIT_URL, load_coco_init
from dmtc.models.inits import INIT_INPUTS, build_model, input_normalization
from dmtc.tasks.train import train

CAFFE_MEAN = [104.008, 116.669, 122.675]


def _hung_layout(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A DeepLabV2 state dict in Hung et al.'s key layout: ResNet keys bare, ASPP as layer5.conv2d_list.i."""
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue  # the original file has none
        if key.startswith("backbone."):
            key = key[len("backbone."):]
        else:
            key = "layer5.conv2d_list." + key[len("classifier.convs."):]
        state[prefix + key] = value.clone()
    return state


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, prefix: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        if key.startswith(prefix) and not key.endswith("num_batches_tracked"):
            assert torch.equal(sa[key], sb[key]), key


def test_command_line_coco_init_switches_inputs_and_weights(compose_cfg):
    cfg = compose_cfg(overrides=["dataset=city", "backbone=resnet101", "backbone.init=coco"])
    norm = input_normalization(cfg)
    assert norm == {"mean": CAFFE_MEAN, "std": [1.0, 1.0, 1.0], "bgr": True, "value_scale": 1.0}
    assert cfg.backbone.weights.endswith("resnet101COCO-41f33a49.pth")
    # the transform built from it gives Caffe inputs: BGR, 0-255, mean subtracted
    image = tv_tensors.Image(torch.tensor([10, 20, 30], dtype=torch.uint8).view(3, 1, 1))
    out, _ = build_eval_transform(**norm)(image, tv_tensors.Mask(torch.zeros(1, 1, dtype=torch.uint8)))
    assert out.flatten().tolist() == pytest.approx([30 - CAFFE_MEAN[0], 20 - CAFFE_MEAN[1], 10 - CAFFE_MEAN[2]])

    imagenet = compose_cfg(overrides=["dataset=city", "backbone=resnet101"])
    assert input_normalization(imagenet) == {**INIT_INPUTS["imagenet"], "std": [0.229, 0.224, 0.225]}
    assert imagenet.backbone.weights.endswith("resnet101-63fe2227.pth")
    # another init asked for in code (one model of a pair) gets that init's pipeline, whatever the config says
    assert input_normalization(imagenet, init="coco")["bgr"] is True
    # an explicit field still wins for the config's own init
    custom = compose_cfg(overrides=["dataset=city", "backbone=resnet101", "backbone.init=coco",
                                    "backbone.input.mean=[1,2,3]"])
    assert input_normalization(custom)["mean"] == [1.0, 2.0, 3.0] and input_normalization(custom)["bgr"] is True
    assert compose_cfg(overrides=[]).backbone.weights is None  # resnet_tiny: init none


@pytest.mark.parametrize("prefix", ["", "Scale."])
def test_original_coco_file_is_converted_on_load(tmp_path, prefix):
    source = deeplab_v2(21, backbone="resnet_tiny")
    path = tmp_path / "resnet101COCO-41f33a49.pth"
    torch.save(_hung_layout(source, prefix), path)

    voc = deeplab_v2(21, backbone="resnet_tiny")
    report = load_coco_init(voc, path)
    _assert_same(voc, source, "")  # backbone and the 21-class COCO head, as DMT's voc_coco file
    assert not report.skipped and not report.unused

    city = deeplab_v2(19, backbone="resnet_tiny", aspp_dilations=(6, 12))
    head = city.classifier.convs[0].weight.clone()
    report = load_coco_init(city, path)  # no warning escapes: the head mismatch is expected
    _assert_same(city, source, "backbone.")
    assert torch.equal(city.classifier.convs[0].weight, head)  # 19 classes: head keeps its random init
    assert len(report.skipped) == 4 and len(report.unused) == 4  # d6/d12 skipped, d18/d24 unused


def test_dmt_converted_file(tmp_path):
    source = deeplab_v2(19, backbone="resnet_tiny")
    state = {k.replace("classifier.convs.", "classifier.0.convs."): v for k, v in source.state_dict().items()}
    path = tmp_path / "city_coco_resnet101.pt"
    torch.save({"model": state, "optimizer": None, "lr_scheduler": None}, path)
    model = deeplab_v2(19, backbone="resnet_tiny")
    report = load_coco_init(model, path)
    _assert_same(model, source, "")
    assert not report.skipped and not report.missing


def test_coco_init_resnet101_through_build_model(compose_cfg, tmp_path):
    source = deeplab_v2(21, backbone="resnet101")
    weights = tmp_path / "w"
    weights.mkdir()
    torch.save({k: v.half() for k, v in _hung_layout(source).items()}, weights / "resnet101COCO-41f33a49.pth")
    del source
    cfg = compose_cfg(overrides=["dataset=city", "backbone=resnet101", "backbone.init=coco",
                                 f"paths.weights_dir={weights}"])
    model = build_model(cfg)
    loaded = torch.load(weights / "resnet101COCO-41f33a49.pth", weights_only=True)
    own = model.state_dict()
    assert torch.equal(own["backbone.layer4.2.conv3.weight"], loaded["layer4.2.conv3.weight"].float())
    assert torch.equal(own["backbone.bn1.running_var"], loaded["bn1.running_var"].float())
    assert model.classifier.convs[0].weight.shape[0] == 19


def test_missing_coco_file_names_path_and_origin(compose_cfg, capsys, tmp_path):
    cfg = compose_cfg(overrides=["dataset=city", "backbone=resnet101", "backbone.init=coco",
                                 f"paths.weights_dir={tmp_path / 'w'}"])
    with pytest.raises(DMTCError, match="resnet101COCO-41f33a49.pth"):
        build_model(cfg)
    # through the entry point (on the synthetic set): one error line naming the file and its origin
    cfg = compose_cfg(overrides=["backbone=resnet101", "backbone.init=coco", f"paths.weights_dir={tmp_path / 'w'}"])
    err = expect_user_error(train, cfg, capsys, str(tmp_path / "w" / "resnet101COCO-41f33a49.pth"), COCO_INIT_URL)
    assert "city_coco_resnet101.pt" in err


def test_coco_needs_resnet101_and_inits_are_checked(compose_cfg):
    with pytest.raises(DMTCError, match="backbone=resnet101"):
        build_model(compose_cfg(overrides=["backbone=resnet50", "backbone.init=coco"]))
    with pytest.raises(DMTCError, match="imagenet, coco, none"):
        input_normalization(compose_cfg(overrides=["backbone.init=places"]))
