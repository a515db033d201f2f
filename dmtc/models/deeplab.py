"""DeepLab-v2 (Chen et al., "DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous
Convolution, and Fully Connected CRFs", TPAMI 2017) as used by DMT (Feng et al., "DMT: Dynamic Mutual
Training for Semi-Supervised Learning", Pattern Recognition 2022).

A dilated ResNet at output stride 8 followed by the ASPP-v2 head: one 3×3 convolution with bias per
dilation rate (padding = rate) from the backbone features straight to class scores, branch outputs summed.
No CRF, no upsampling: logits come out at 1/8 resolution.

The released DMT/DMTC code holds four branches (rates 6, 12, 18, 24) but returns from its summing loop after
the second, so its published models compute ``conv_d6(x) + conv_d12(x)``; ``aspp_dilations=(6, 12)``
reproduces that exactly. The default (6, 12, 18, 24) is the ASPP-v2 of the DeepLab paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dmtc.errors import DMTCError
from dmtc.models.backbones import ResNetBackbone, build_backbone


class ASPPv2(nn.Module):
    """ASPP-v2 head: ``sum_d conv3x3_d(x)``, one biased 3×3 conv ``in_channels → num_classes`` per rate d.

    Weights are drawn from N(0, 0.01²) and biases set to 0, DeepLab's initialisation of its classifier.
    """

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=d, dilation=d, bias=True) for d in self.dilations
        )
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
    ``projection`` (:class:`ProjectionHead` or None) and ``projection_dim`` (its width or None).
    """

    def __init__(
        self,
        backbone: ResNetBackbone,
        num_classes: int,
        aspp_dilations: Sequence[int],
        projection_dim: int | None = None,
        projection_hidden: int = 256,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = ASPPv2(backbone.out_channels, num_classes, aspp_dilations)
        self.num_classes = int(num_classes)
        self.feature_channels = int(backbone.out_channels)
        self.aspp_dilations = self.classifier.dilations
        self.backbone_name = backbone.name
        self.projection = (
            ProjectionHead(self.feature_channels, projection_dim, projection_hidden) if projection_dim else None
        )
        self.projection_dim = int(projection_dim) if projection_dim else None

    def forward(self, images: torch.Tensor, return_features: bool = False) -> dict[str, torch.Tensor]:
        """N×3×H×W images → ``{"logits": N×C×h×w}`` with h = ceil(H/8), w = ceil(W/8), not upsampled.

        With ``return_features`` the dict also holds ``"backbone_features"`` (N×F×h×w, the last backbone
        stage's output, F = ``feature_channels``). A model with a projection head always adds
        ``"features"`` (N×``projection_dim``×h×w, not normalised), the input of DMTC's contrastive loss.
        """
        features = self.backbone(images)
        out = {"logits": self.classifier(features)}
        if self.projection is not None:
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
) -> DeepLabV2:
    """Build DeepLab-v2 on ``backbone`` with an ASPP-v2 head of ``aspp_dilations``.

    ``pretrained``: local torchvision ImageNet state-dict file for the backbone (``fc.*`` ignored), e.g.
    ``resnet101-63fe2227.pth``; ``None`` keeps torchvision's random init. ``aspp_dilations=(6, 12)`` gives
    the model the released DMT/DMTC code computes. ``projection_dim`` (DMTC: 150) adds DMTC's projection
    head (:class:`ProjectionHead`, ``projection_hidden`` wide) and ``"features"`` to the output.
    """
    if num_classes < 1:
        raise DMTCError(f"num_classes must be positive, got {num_classes}.")
    if len(aspp_dilations) == 0 or any(int(d) < 1 for d in aspp_dilations):
        raise DMTCError(f"aspp_dilations must be a non-empty list of positive rates, got {list(aspp_dilations)}.")
    if projection_dim is not None and (int(projection_dim) < 1 or int(projection_hidden) < 1):
        raise DMTCError(f"projection_dim and projection_hidden must be positive, got {projection_dim}, "
                        f"{projection_hidden}.")
    return DeepLabV2(build_backbone(backbone, pretrained), num_classes, aspp_dilations, projection_dim,
                     projection_hidden)
