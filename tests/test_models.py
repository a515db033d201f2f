"""DeepLab-v2 models, backbones and checkpoint loading (dmtc.models)."""

import warnings

import pytest
import torch
import torchvision
from torch import nn

from dmtc.errors import DMTCError
from dmtc.models import LoadReport, deeplab_v2, load_dmt_checkpoint


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("backbone", "channels"), [("resnet_tiny", 128), ("resnet18", 512), ("resnet50", 2048)])
def test_output_stride_8_and_features(backbone, channels):
    torch.manual_seed(0)
    model = deeplab_v2(5, backbone).eval()
    assert model.feature_channels == channels
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 65))
        assert set(out) == {"logits"}
        assert out["logits"].shape == (1, 5, 9, 9)
        out = model(torch.randn(2, 3, 64, 48), return_features=True)
    assert out["logits"].shape == (2, 5, 8, 6)
    assert out["backbone_features"].shape == (2, channels, 8, 6)


def test_basicblock_dilation_follows_torchvision_bottleneck_rule():
    backbone = deeplab_v2(3, "resnet18").backbone
    # layer3: strided block loses its stride; conv after the removed stride gets dilation 2.
    first3, second3 = backbone.layer3
    assert first3.conv1.stride == (1, 1) and first3.downsample[0].stride == (1, 1)
    assert (first3.conv1.dilation, first3.conv2.dilation) == ((1, 1), (2, 2))
    assert second3.conv1.dilation == second3.conv2.dilation == (2, 2)
    first4, second4 = backbone.layer4
    assert (first4.conv1.dilation, first4.conv2.dilation) == ((2, 2), (4, 4))
    assert second4.conv1.padding == second4.conv2.padding == (4, 4)
    assert not hasattr(backbone, "fc") and not hasattr(backbone, "avgpool")


def test_parameter_count_resnet101_19_classes():
    # torchvision's ResNet-101 without its fc layer + four 3×3 ASPP convs 2048 → 19 with bias (two for the
    # released model)
    import torchvision

    backbone = sum(p.numel() for n, p in torchvision.models.resnet101().named_parameters() if not n.startswith("fc."))
    branch = 2048 * 19 * 3 * 3 + 19
    assert _n_params(deeplab_v2(19, "resnet101")) == backbone + 4 * branch == 43_901_068
    assert _n_params(deeplab_v2(19, "resnet101", aspp_dilations=(6, 12))) == backbone + 2 * branch


def test_head_init_and_unknown_backbone():
    model = deeplab_v2(4, "resnet_tiny", aspp_dilations=(6, 12))
    assert len(model.classifier.convs) == 2
    assert [c.dilation for c in model.classifier.convs] == [(6, 6), (12, 12)]
    assert all(float(c.bias.detach().abs().sum()) == 0.0 for c in model.classifier.convs)
    assert 0.005 < float(model.classifier.convs[0].weight.detach().std()) < 0.02
    with pytest.raises(DMTCError, match="resnet_tiny"):
        deeplab_v2(4, "resnet7")


# --- the released DMT model, re-implemented minimally for the reference-exact check -------------------


class _ReleasedASPP(nn.Module):
    """Four biased 3x3 convs; like the released code, returns inside the summing loop (d6 + d12 only)."""

    def __init__(self, in_channels, num_classes, rates=(6, 12, 18, 24)):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates
        )

    def forward(self, x):
        out = self.convs[0](x)
        for i in range(len(self.convs) - 1):
            out = out + self.convs[i + 1](x)
            return out
        return out


class _ReleasedDeepLabV2(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        resnet = torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
        del resnet.fc, resnet.avgpool
        self.backbone = resnet
        self.classifier = nn.Sequential(_ReleasedASPP(2048, num_classes))

    def forward(self, x):
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return self.classifier(x)


def test_reference_exact_against_released_dmt_model(tmp_path):
    torch.manual_seed(1)
    ref = _ReleasedDeepLabV2(19)
    with torch.no_grad():  # non-trivial BN statistics and head biases, so every tensor matters
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.1, 0.1)
        for conv in ref.classifier[0].convs:
            conv.bias.uniform_(-1, 1)
    path = tmp_path / "dmt.pt"
    torch.save({"model": ref.state_dict(), "optimizer": {}, "lr_scheduler": {}}, path)

    ours = deeplab_v2(19, "resnet101", aspp_dilations=(6, 12))
    report = load_dmt_checkpoint(ours, path)
    assert isinstance(report, LoadReport)
    assert report.skipped == [] and report.missing == []
    assert report.unused == [f"classifier.0.convs.{i}.{p}" for i in (2, 3) for p in ("bias", "weight")]
    ref.eval()
    ours.eval()
    x = torch.randn(1, 3, 41, 41)
    with torch.no_grad():
        expected = ref(x)
        got = ours(x)["logits"]
    assert got.shape == expected.shape == (1, 19, 6, 6)
    torch.testing.assert_close(got, expected)


# --- checkpoint loading on the tiny backbone -----------------------------------------------------------


def _dmt_style_state(model, prefix=""):
    """A dmtc model's state dict under DMT's key names (classifier.0.convs.*)."""
    return {prefix + k.replace("classifier.convs.", "classifier.0.convs."): v for k, v in model.state_dict().items()}


def test_head_mismatch_skipped_with_one_warning_or_error(tmp_path):
    torch.manual_seed(0)
    coco = deeplab_v2(21, "resnet_tiny")
    path = tmp_path / "coco.pt"
    torch.save({"model": _dmt_style_state(coco, prefix="module."), "optimizer": None}, path)

    city = deeplab_v2(19, "resnet_tiny")
    head_before = city.classifier.convs[0].weight.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = load_dmt_checkpoint(city, path)
    assert len(caught) == 1
    assert "21 classes" in str(caught[0].message) and "19" in str(caught[0].message)
    assert report.skipped == [f"classifier.convs.{i}.{p}" for i in range(4) for p in ("bias", "weight")]
    assert report.unused == [] and report.missing == []
    torch.testing.assert_close(city.classifier.convs[0].weight, head_before)
    torch.testing.assert_close(city.backbone.conv1.weight, coco.backbone.conv1.weight)

    with pytest.raises(DMTCError, match=r"21 classes but the model has 19"):
        load_dmt_checkpoint(deeplab_v2(19, "resnet_tiny"), path, allow_head_mismatch=False)


def test_lightning_checkpoint_round_trip_picks_model(tmp_path):
    torch.manual_seed(0)
    a, b = deeplab_v2(3, "resnet_tiny"), deeplab_v2(3, "resnet_tiny")
    state = {f"models.a.{k}": v for k, v in a.state_dict().items()}
    state |= {f"models.b.{k}": v for k, v in b.state_dict().items()}
    state["bank.queue"] = torch.zeros(4, 2)
    path = tmp_path / "epoch=1.ckpt"
    torch.save({"epoch": 1, "global_step": 10, "state_dict": state}, path)

    x = torch.randn(1, 3, 32, 32)
    for key, source in ((None, a), ("a", a), ("b", b)):
        target = deeplab_v2(3, "resnet_tiny").eval()
        report = load_dmt_checkpoint(target, path, model_key=key)
        assert report.unused == [] and report.missing == [] and report.skipped == []
        assert len(report.loaded) == len(target.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(target(x)["logits"], source.eval()(x)["logits"])
    with pytest.raises(DMTCError, match="'c'"):
        load_dmt_checkpoint(deeplab_v2(3, "resnet_tiny"), path, model_key="c")

    only_b = tmp_path / "only_b.ckpt"
    torch.save({"state_dict": {f"models.b.{k}": v for k, v in b.state_dict().items()}}, only_b)
    target = deeplab_v2(3, "resnet_tiny")
    load_dmt_checkpoint(target, only_b)
    torch.testing.assert_close(target.backbone.conv1.weight, b.backbone.conv1.weight)


def test_two_branch_file_into_four_branch_model_warns_missing(tmp_path):
    two = deeplab_v2(3, "resnet_tiny", aspp_dilations=(6, 12))
    path = tmp_path / "two.pt"
    torch.save(two.state_dict(), path)
    with pytest.warns(UserWarning, match="lacks 4 model tensors"):
        report = load_dmt_checkpoint(deeplab_v2(3, "resnet_tiny"), path)
    assert report.missing == [f"classifier.convs.{i}.{p}" for i in (2, 3) for p in ("bias", "weight")]


def test_checkpoint_errors(tmp_path):
    model = deeplab_v2(3, "resnet18")
    missing = tmp_path / "nope.pt"
    with pytest.raises(DMTCError, match="nope.pt"):
        load_dmt_checkpoint(model, missing)

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DMTCError, match="junk.pt"):
        load_dmt_checkpoint(model, junk)

    not_ckpt = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_ckpt)
    with pytest.raises(DMTCError, match="not a model checkpoint"):
        load_dmt_checkpoint(model, not_ckpt)

    tiny = tmp_path / "tiny.pt"
    torch.save({"model": _dmt_style_state(deeplab_v2(3, "resnet_tiny"))}, tiny)
    with pytest.raises(DMTCError, match="resnet_tiny"):
        load_dmt_checkpoint(model, tiny)

    with pytest.raises(DMTCError, match="single model"):
        load_dmt_checkpoint(model, tiny, model_key="b")


# --- pretrained torchvision weights -------------------------------------------------------------------


def test_pretrained_torchvision_file(tmp_path):
    torch.manual_seed(3)
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(tv.state_dict(), path)
    assert any(k.startswith("fc.") for k in tv.state_dict())

    model = deeplab_v2(21, "resnet18", pretrained=path)
    got = model.backbone.state_dict()
    expected = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    assert set(got) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v)

    missing = tmp_path / "weights" / "resnet101-63fe2227.pth"
    with pytest.raises(DMTCError) as err:
        deeplab_v2(19, "resnet101", pretrained=missing)
    assert str(missing) in str(err.value)
    assert "https://download.pytorch.org/models/resnet101-63fe2227.pth" in str(err.value)

    with pytest.raises(DMTCError, match="no pretrained weights"):
        deeplab_v2(19, "resnet_tiny", pretrained=path)

    with pytest.raises(DMTCError, match="do not fit"):  # resnet18 weights for a resnet34 backbone
        deeplab_v2(19, "resnet34", pretrained=path)
