"""DeepLab-v2 (Chen et al., "DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous
Convolution, and Fully Connected CRFs", TPAMI 2017) as used by DMT (Feng et al., "DMT: Dynamic Mutual
Training for Semi-Supervised Learning", Pattern Recognition 2022).

A dilated ResNet at output stride 8 followed by the ASPP-v2 head: one 3×3 convolution with bias per
dilation rate (padding = rate) from the backbone features straight to class scores, branch outputs summed.
No CRF, no upsampling: logits come out at 1/8 resolution.

The released DMT/DMTC code holds four branches (rates 6, 12, 18, 24) but returns from its summing loop after
the second, so its published models compute ``conv_d6(x) + conv_d12(x)``, and its head convs keep PyTorch's
default initialisation; ``aspp_dilations=(6, 12), head_init="pytorch"`` reproduces that exactly (the
default of ``dataset=city|voc``). The defaults of :func:`deeplab_v2` (6, 12, 18, 24) with N(0, 0.01) weights
are the ASPP-v2 of the DeepLab paper.

Logits are upsampled to label resolution by :func:`upsample_logits`, the one place that decides the
interpolation: bilinear with ``align_corners`` as the model says (:attr:`DeepLabV2.align_corners`; the
reference code uses ``True`` for training, labeling and evaluation, which aligns exactly for its 8k+1 crop
and evaluation sizes 321 and 505).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmtc.errors import DMTCError
from dmtc.models.backbones import ResNetBackbone, build_backbone

HEAD_INITS = ("normal", "pytorch")
"""ASPP-v2 head initialisations: ``normal`` = N(0, 0.01²) weights and zero biases (DeepLab's), ``pytorch`` =
``nn.Conv2d``'s default (Kaiming-uniform weights, uniform biases), which the released DMT/DMTC models keep."""


def upsample_logits(logits: torch.Tensor, size: Sequence[int], *, align_corners: bool = False) -> torch.Tensor:
    """Bilinear upsampling of N×C×h×w logits (or probabilities) to ``size`` = (H, W); unchanged if already
    that size. ``align_corners=True`` is the reference DMT code's choice (training, labeling, evaluation)."""
    if tuple(logits.shape[-2:]) == tuple(int(s) for s in size):
        return logits
    return F.interpolate(logits, size=tuple(int(s) for s in size), mode="bilinear", align_corners=bool(align_corners))


def model_align_corners(model: nn.Module) -> bool:
    """The upsampling mode a model was built with (:attr:`DeepLabV2.align_corners`; False for other modules)."""
    return bool(getattr(model, "align_corners", False))


class ASPPv2(nn.Module):
    """ASPP-v2 head: ``sum_d conv3x3_d(x)``, one biased 3×3 conv ``in_channels → num_classes`` per rate d.

    ``init="normal"``: weights drawn from N(0, 0.01²), biases 0 (DeepLab's initialisation of its classifier);
    ``init="pytorch"``: PyTorch's default conv initialisation, as the released DMT/DMTC code leaves it.
    """

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int], init: str = "normal") -> None:
        super().__init__()
        if init not in HEAD_INITS:
            raise DMTCError(f"model.head_init={init!r}: use normal (N(0, 0.01), DeepLab) or pytorch (PyTorch's "
                            "default, the released DMT/DMTC models)")
        self.dilations = tuple(int(d) for d in dilations)
        self.init = init
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=d, dilation=d, bias=True) for d in self.dilations
        )
        if init == "normal":
            for conv in self.convs:
                nn.init.normal_(conv.weight, mean=0.0, std=0.01)
                nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×F×h×w features → N×C×h×w summed branch scores."""
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        return out


class ProjectionHead(nn.Sequential):
    """DMTC's projection head for the regional contrastive loss (ReCo, Liu et al., ICLR 2022):
    3×3 conv ``in_channels → hidden`` (no bias), BatchNorm, ReLU, 1×1 conv ``hidden → dim`` (with bias).

    DMTC uses hidden 256 and dim 150 on DeepLab-v2's last backbone features (stride 8).
    """

    def __init__(self, in_channels: int, dim: int, hidden: int = 256) -> None:
        super().__init__(
            nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, dim, kernel_size=1),
        )
        self.dim = int(dim)


class DeepLabV2(nn.Module):
    """Dilated ResNet backbone + ASPP-v2 classifier; ``forward`` returns logits at output stride 8.

    Attributes: ``backbone`` (:class:`ResNetBackbone`), ``classifier`` (:class:`ASPPv2`), ``num_classes``,
    ``feature_channels`` (channels of the backbone's last stage), ``aspp_dilations``, ``backbone_name``,
    ``projection`` (:class:`ProjectionHead` or None), ``projection_dim`` (its width or None),
    ``projection_hidden``, ``head_init``, ``align_corners`` (how :meth:`upsample` interpolates) and
    ``inputs`` (the input pipeline the weights expect, ``{"init", "mean", "std", "bgr", "value_scale"}``, set
    by whoever initialises the weights, :func:`dmtc.models.inits.build_model`; None if unknown).
    """

    def __init__(
        self,
        backbone: ResNetBackbone,
        num_classes: int,
        aspp_dilations: Sequence[int],
        projection_dim: int | None = None,
        projection_hidden: int = 256,
        *,
        head_init: str = "normal",
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = ASPPv2(backbone.out_channels, num_classes, aspp_dilations, init=head_init)
        self.num_classes = int(num_classes)
        self.feature_channels = int(backbone.out_channels)
        self.aspp_dilations = self.classifier.dilations
        self.backbone_name = backbone.name
        self.projection = (
            ProjectionHead(self.feature_channels, projection_dim, projection_hidden) if projection_dim else None
        )
        self.projection_dim = int(projection_dim) if projection_dim else None
        self.projection_hidden = int(projection_hidden)
        self.head_init = head_init
        self.align_corners = bool(align_corners)
        self.inputs: dict[str, Any] | None = None

    def architecture(self) -> dict[str, Any]:
        """What rebuilds this model (:func:`deeplab_v2` arguments), plus its input pipeline when known:
        stored in dmtc checkpoints so evaluation and labeling need no architecture flags."""
        return {
            "backbone": self.backbone_name,
            "num_classes": self.num_classes,
            "aspp_dilations": list(self.aspp_dilations),
            "projection_dim": self.projection_dim,
            "projection_hidden": self.projection_hidden,
            "head_init": self.head_init,
            "align_corners": self.align_corners,
            "inputs": dict(self.inputs) if self.inputs else None,
        }

    def upsample(self, logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """:func:`upsample_logits` with this model's ``align_corners``."""
        return upsample_logits(logits, size, align_corners=self.align_corners)

    def forward(self, images: torch.Tensor, return_features: bool = False) -> dict[str, torch.Tensor]:
        """N×3×H×W images → ``{"logits": N×C×h×w}`` with h = ceil(H/8), w = ceil(W/8), not upsampled.

        With ``return_features`` the dict also holds ``"backbone_features"`` (N×F×h×w, the last backbone
        stage's output, F = ``feature_channels``). A model with a projection head adds, in training mode,
        ``"features"`` (N×``projection_dim``×h×w, not normalised), the input of DMTC's contrastive loss;
        in eval mode (validation, labeling, evaluation) nothing reads it, so it is not computed (~4% of a
        ResNet-101 forward).
        """
        features = self.backbone(images)
        out = {"logits": self.classifier(features)}
        if self.projection is not None and self.training:
            out["features"] = self.projection(features)
        if return_features:
            out["backbone_features"] = features
        return out


def deeplab_v2(
    num_classes: int,
    backbone: str = "resnet101",
    aspp_dilations: Sequence[int] = (6, 12, 18, 24),
    pretrained: str | Path | None = None,
    projection_dim: int | None = None,
    projection_hidden: int = 256,
    *,
    head_init: str = "normal",
    align_corners: bool = False,
) -> DeepLabV2:
    """Build DeepLab-v2 on ``backbone`` with an ASPP-v2 head of ``aspp_dilations``.

    ``pretrained``: local torchvision ImageNet state-dict file for the backbone (``fc.*`` ignored), e.g.
    ``resnet101-63fe2227.pth``; ``None`` keeps torchvision's random init. ``aspp_dilations=(6, 12)`` with
    ``head_init="pytorch"`` gives the model the released DMT/DMTC code computes (``normal``: DeepLab's
    N(0, 0.01)). ``projection_dim`` (DMTC: 150) adds DMTC's projection head (:class:`ProjectionHead`,
    ``projection_hidden`` wide) and ``"features"`` to the output. ``align_corners``: how
    :meth:`DeepLabV2.upsample` brings logits to label size (the reference code: True).
    """
    if num_classes < 1:
        raise DMTCError(f"num_classes must be positive, got {num_classes}.")
    if len(aspp_dilations) == 0 or any(int(d) < 1 for d in aspp_dilations):
        raise DMTCError(f"aspp_dilations must be a non-empty list of positive rates, got {list(aspp_dilations)}.")
    if projection_dim is not None and (int(projection_dim) < 1 or int(projection_hidden) < 1):
        raise DMTCError(f"projection_dim and projection_hidden must be positive, got {projection_dim}, "
                        f"{projection_hidden}.")
    return DeepLabV2(build_backbone(backbone, pretrained), num_classes, aspp_dilations, projection_dim,
                     projection_hidden, head_init=head_init, align_corners=align_corners)
