"""Losses: DMT's dynamic mutual loss and DMTC's regional contrastive loss (ReCo)."""

from dmtc.losses.mutual import dynamic_mutual_loss, dynamic_mutual_loss_with_stats
from dmtc.losses.reco import RecoSample, downsample_nearest, reco_loss, reco_loss_from_sample, sample_reco

__all__ = [
    "RecoSample",
    "downsample_nearest",
    "dynamic_mutual_loss",
    "dynamic_mutual_loss_with_stats",
    "reco_loss",
    "reco_loss_from_sample",
    "sample_reco",
]
