"""DMTC's contrastive term for either stage: which pixels take part, ReCo on them, and the memory bank.

DMTC adds to each model's segmentation loss ``weight · reco_loss`` (ReCo, Liu et al., ICLR 2022) on the
model's own projected features (:mod:`dmtc.losses.reco`):

* **pixels** (:func:`contrastive_pixels`): warm-up: labels = ground truth, valid = label != 255; phases:
  labels = ground truth ++ the *other* model's pseudo labels (the same targets as the mutual loss), valid =
  label != 255 and, on pseudo-labeled images, the other model's stored confidence > ``weak_threshold`` (the
  confidence of the label's source, as ReCo gates its pseudo labels by the teacher's confidence);
* **anchors** are hard for the *current* model (its detached softmax < ``strong_threshold``), at the
  feature grid (``resolution="feature"``: labels, validity and probabilities resized nearest to stride 8)
  or the crop (``"crop"``: features upsampled bilinearly, DMTC's code);
* **bank** (``bank_size > 0``, ours): each model has a :class:`~dmtc.losses.memory_bank.ClassMemoryBank`;
  the loss draws negatives from batch ∪ bank, then the step's valid features are enqueued (after the loss,
  so a batch never meets its own keys; all-gathered across DDP ranks).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from dmtc.data.layouts import IGNORE_INDEX
from dmtc.losses.memory_bank import ClassMemoryBank, select_pixels
from dmtc.losses.reco import downsample_nearest, reco_loss
from dmtc.models.deeplab import model_align_corners, upsample_logits
from dmtc.settings import ContrastiveSettings


def make_banks(settings: ContrastiveSettings, models: Mapping[str, nn.Module], num_classes: int
               ) -> dict[str, ClassMemoryBank]:
    """One memory bank per model (``{}`` when ``bank_size`` or the weight is 0); the models must have a
    projection head (``projection_dim``), which sizes the bank's feature rows."""
    dims = {k: getattr(m, "projection_dim", None) for k, m in models.items()}
    if not all(dims.values()):
        raise ValueError(f"the contrastive term needs models with a projection head; projection_dim: {dims}")
    if settings.bank_size == 0 or not settings.active:
        return {}
    return {k: ClassMemoryBank(num_classes, int(d), settings.bank_size) for k, d in dims.items()}


def contrastive_pixels(labels: torch.Tensor, settings: ContrastiveSettings, *, is_pseudo: torch.Tensor | None = None,
                       confidence: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """N×H×W bool: the pixels that take part. ``labels != ignore_index``; with ``is_pseudo`` (N bool: the
    pseudo-labeled images) and ``confidence`` (N×H×W: their source model's stored confidence, 1 on labeled
    images), pseudo-labeled pixels only where ``confidence > weak_threshold``."""
    valid = labels != ignore_index
    if is_pseudo is None:
        return valid
    pixel_pseudo = is_pseudo.view(-1, 1, 1)
    return valid & (~pixel_pseudo | (confidence > settings.weak_threshold))


def contrastive_term(
    settings: ContrastiveSettings,
    model: nn.Module,
    out: Mapping[str, torch.Tensor],
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    bank: ClassMemoryBank | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(weight · reco_loss, values to log)`` for one model, then its bank is fed.

    ``out``: the model's output (stride-8 ``logits`` and ``features``); ``logits``: the same upsampled to
    label resolution; ``labels``/``valid``: N×H×W targets and :func:`contrastive_pixels`. With weight 0 the
    term is a 0 tied to the features: the projection head stays in the graph (DDP expects every parameter
    to get a gradient) while the loss stays exactly the DMT loss. Logged values are tensors (no host sync):
    ``contrastive`` and, with a bank, ``bank_fill_mean``.
    """
    features = out["features"]
    if not settings.active:
        return features.sum() * 0.0, {}
    if settings.resolution == "feature":
        probs_small = out["logits"].detach().float().softmax(1)
        labels_k, valid_k, probs_k = downsample_nearest(labels, valid, probs_small, features.shape[-2:])
    else:  # DMTC's crop-resolution variant
        features = upsample_logits(features, labels.shape[-2:], align_corners=model_align_corners(model))
        labels_k, valid_k, probs_k = labels, valid, logits.detach().float().softmax(1)
    valid_k = valid_k & (labels_k != ignore_index)
    labels_k = torch.where(valid_k, labels_k, 0)
    loss = reco_loss(
        features, labels_k, valid_k, probs_k, strong_threshold=settings.strong_threshold,
        temperature=settings.temperature, num_queries=settings.num_queries,
        num_negatives=settings.num_negatives, memory=bank, shared_negatives=settings.shared_negatives,
        bank_prototypes=settings.bank_prototypes, raw_prototypes=settings.raw_prototypes,
    )
    logged = {"contrastive": loss.detach()}
    if bank is not None:
        bank.enqueue(*select_pixels(features.detach(), labels_k, valid_k),
                     max_per_class=settings.bank_per_class_per_step)
        logged["bank_fill_mean"] = bank.count.float().mean()
    return settings.weight * loss, logged
