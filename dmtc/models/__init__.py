"""Segmentation models: DeepLab-v2 (ASPP-v2) on dilated torchvision ResNets, and checkpoint loading."""

from dmtc.models.backbones import BACKBONES, PRETRAINED_URLS, ResNetBackbone, build_backbone, load_pretrained
from dmtc.models.checkpoints import LoadReport, load_dmt_checkpoint, model_state, read_checkpoint, release_layout
from dmtc.models.deeplab import HEAD_INITS, ASPPv2, DeepLabV2, deeplab_v2, model_align_corners, upsample_logits

__all__ = [
    "ASPPv2",
    "BACKBONES",
    "DeepLabV2",
    "HEAD_INITS",
    "LoadReport",
    "PRETRAINED_URLS",
    "ResNetBackbone",
    "build_backbone",
    "deeplab_v2",
    "load_dmt_checkpoint",
    "load_pretrained",
    "model_state",
    "read_checkpoint",
    "release_layout",
    "model_align_corners",
    "upsample_logits",
]
