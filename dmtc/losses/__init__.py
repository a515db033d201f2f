"""Losses: DMT's dynamic mutual loss and DMTC's regional contrastive loss (ReCo)."""

from dmtc.losses.mutual import dynamic_mutual_loss, dynamic_mutual_loss_with_stats
from dmtc.losses.reco import reco_loss

__all__ = ["dynamic_mutual_loss", "dynamic_mutual_loss_with_stats", "reco_loss"]
