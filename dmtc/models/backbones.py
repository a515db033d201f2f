"""Dilated ResNet backbones at output stride 8, built on torchvision's ResNet blocks.

Names: ``resnet101`` and ``resnet50`` (torchvision Bottleneck models with
``replace_stride_with_dilation=[False, True, True]``, as in DeepLab-v2 / DMT), ``resnet34`` and ``resnet18``
(torchvision BasicBlock models, dilated here because torchvision refuses dilation for BasicBlock), and
``resnet_tiny`` (BasicBlock, one block per stage, widths 16/32/64/128; for CPU demos and tests, no
pretrained weights exist).

The backbone keeps torchvision's module names (``conv1, bn1, layer1..layer4``) and has no ``avgpool``/``fc``,
so its state-dict keys are torchvision's minus ``fc.*``. Pretrained weights are read from a local
torchvision state-dict file only; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from dmtc.errors import DMTCError

# Where the ImageNet weights of each torchvision backbone come from (the file name is the one to pass).
PRETRAINED_URLS: dict[str, str] = {
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
}

TINY_WIDTHS = (16, 32, 64, 128)


class ResNetBackbone(nn.Module):
    """ResNet trunk (stem + four stages) returning the last stage's feature map at output stride 8.

    ``out_channels`` is the number of channels of that map; ``name`` the backbone's registry name.
    """

    def __init__(
        self,
        name: str,
        conv1: nn.Module,
        bn1: nn.Module,
        layers: list[nn.Sequential],
        out_channels: int,
    ) -> None:
        super().__init__()
        self.name = name
        self.out_channels = out_channels
        self.conv1 = conv1
        self.bn1 = bn1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×3×H×W images → N×``out_channels``×ceil(H/8)×ceil(W/8) features."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def _set_dilation(conv: nn.Conv2d, dilation: int) -> None:
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation, dilation)


def _dilate_basic_layer(layer: nn.Sequential, previous_dilation: int, dilation: int) -> None:
    """Replace a BasicBlock stage's stride 2 by dilation, as torchvision does for Bottleneck stages.

    The strided block loses its stride (conv1 and the downsample 1×1 conv); its conv1 keeps the dilation
    of the stage before (torchvision gives the first Bottleneck's strided 3×3 conv ``previous_dilation``),
    and every 3×3 conv after the removed stride gets the new ``dilation``.
    """
    first = layer[0]
    first.conv1.stride = (1, 1)
    _set_dilation(first.conv1, previous_dilation)
    _set_dilation(first.conv2, dilation)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    for block in list(layer)[1:]:
        _set_dilation(block.conv1, dilation)
        _set_dilation(block.conv2, dilation)


def _from_torchvision(name: str, model: tv_resnet.ResNet, out_channels: int) -> ResNetBackbone:
    layers = [model.layer1, model.layer2, model.layer3, model.layer4]
    return ResNetBackbone(name, model.conv1, model.bn1, layers, out_channels)


def _bottleneck(name: str, factory: Callable[..., tv_resnet.ResNet]) -> ResNetBackbone:
    model = factory(weights=None, replace_stride_with_dilation=[False, True, True])
    return _from_torchvision(name, model, 2048)


def _basic(name: str, factory: Callable[..., tv_resnet.ResNet]) -> ResNetBackbone:
    model = factory(weights=None)
    _dilate_basic_layer(model.layer3, previous_dilation=1, dilation=2)
    _dilate_basic_layer(model.layer4, previous_dilation=2, dilation=4)
    return _from_torchvision(name, model, 512)


def _tiny() -> ResNetBackbone:
    """BasicBlock ResNet, one block per stage, widths 16/32/64/128, torchvision stem and init."""
    w = TINY_WIDTHS
    conv1 = nn.Conv2d(3, w[0], kernel_size=7, stride=2, padding=3, bias=False)
    bn1 = nn.BatchNorm2d(w[0])
    layers = []
    inplanes = w[0]
    for i, planes in enumerate(w):
        stride = 1 if i == 0 else 2
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers.append(nn.Sequential(tv_resnet.BasicBlock(inplanes, planes, stride, downsample)))
        inplanes = planes
    _dilate_basic_layer(layers[2], previous_dilation=1, dilation=2)
    _dilate_basic_layer(layers[3], previous_dilation=2, dilation=4)
    backbone = ResNetBackbone("resnet_tiny", conv1, bn1, layers, w[-1])
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return backbone


_BUILDERS: dict[str, Callable[[], ResNetBackbone]] = {
    "resnet101": lambda: _bottleneck("resnet101", tv_resnet.resnet101),
    "resnet50": lambda: _bottleneck("resnet50", tv_resnet.resnet50),
    "resnet34": lambda: _basic("resnet34", tv_resnet.resnet34),
    "resnet18": lambda: _basic("resnet18", tv_resnet.resnet18),
    "resnet_tiny": _tiny,
}

BACKBONES: tuple[str, ...] = tuple(_BUILDERS)


def build_backbone(name: str, pretrained: str | Path | None = None) -> ResNetBackbone:
    """Build backbone ``name`` (one of :data:`BACKBONES`), randomly initialised as torchvision does.

    ``pretrained``: a local torchvision ImageNet state-dict file loaded with :func:`load_pretrained`.
    """
    if name not in _BUILDERS:
        raise DMTCError(f"Unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}.")
    backbone = _BUILDERS[name]()
    if pretrained is not None:
        load_pretrained(backbone, pretrained)
    return backbone


def load_pretrained(backbone: ResNetBackbone, path: str | Path) -> None:
    """Load a torchvision ResNet state-dict file into ``backbone``, ignoring ``fc.*``.

    Any other missing/unexpected key or shape difference raises :class:`DMTCError`.
    """
    name = backbone.name
    path = Path(path)
    url = PRETRAINED_URLS.get(name)
    if url is None:
        raise DMTCError(
            f"Backbone {name!r} has no pretrained weights (it is a small random-init model for demos and "
            f"tests); set pretrained to null. Pretrained files exist for: {', '.join(PRETRAINED_URLS)}."
        )
    if not path.is_file():
        raise DMTCError(
            f"Pretrained weights file {str(path)!r} for backbone {name!r} not found. Download the torchvision "
            f"ImageNet weights from {url} and point the pretrained path at that file."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure means the file is unusable
        raise DMTCError(
            f"Could not read pretrained weights {str(path)!r} with torch.load(weights_only=True): {e}. "
            f"Expected a torchvision state dict such as {url}."
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DMTCError(
            f"Pretrained weights file {str(path)!r} is not a torchvision state dict (a flat dict of tensors "
            f"such as {url}). For a DMT/DMTC or dmtc checkpoint use dmtc.models.load_dmt_checkpoint."
        )
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise DMTCError(
            f"Pretrained weights {str(path)!r} do not fit backbone {name!r}: {'; '.join(parts)}. "
            f"Use the torchvision file for this backbone: {url}."
        )
    backbone.load_state_dict(state, strict=True)
