"""Dynamic mutual loss of DMT (Feng et al., "DMT: Dynamic Mutual Training for Semi-Supervised Learning",
Pattern Recognition 2022, §3, the dynamic loss weights).

Model A is trained on model B's pseudo labels (and vice versa). On a pseudo-labeled pixel with label y,
stored confidence q (B's softmax probability of y when B made the label) and A's current softmax p:

    argmax p == y                      -> w = p_y ** gamma1   (agreement: trust grows with A's confidence)
    argmax p != y  and  max p > q      -> w = 0               (A is more sure of another class: skip)
    otherwise                          -> w = p_y ** gamma2   (disagreement, B was more confident)

Ground-truth pixels have w = 1, ignored pixels (255) w = 0. The weights are constants (no gradient):

    loss = sum_pixels w * CE(logits, y) / #(non-ignored pixels in the batch)

gamma1 = gamma2 = 0 switches the dynamic weighting off entirely, as the public DMT code does: every
non-ignored pixel gets w = 1, also where the current model "wins" (plain cross-entropy on the pseudo labels,
DMT's ablation "without dynamic weighting"). Only both exponents at 0 are special: gamma1 = 0 with
gamma2 > 0 keeps the rule (w = 1 on agreement, 0 where the current model wins).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dynamic_mutual_loss", "dynamic_mutual_loss_with_stats"]


def _pixel_weights(
    logits: Tensor,
    labels: Tensor,
    confidence: Tensor,
    is_pseudo: Tensor,
    gamma1: float,
    gamma2: float,
    ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Detached per-pixel weights plus the masks the statistics need.

    Returns (weight, valid, pseudo, disagree, current_wins), all N×H×W.
    """
    if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"expected logits N×C×H×W and labels N×H×W, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if confidence.shape != labels.shape:
        raise ValueError(f"confidence {tuple(confidence.shape)} must match labels {tuple(labels.shape)}")
    if is_pseudo.shape != (logits.shape[0],):
        raise ValueError(f"is_pseudo must have shape ({logits.shape[0]},), got {tuple(is_pseudo.shape)}")
    with torch.no_grad():
        valid = labels != ignore_index
        safe = labels.masked_fill(~valid, 0)
        dtype = torch.promote_types(logits.dtype, torch.float32)  # fp16/bf16 logits: weights in fp32
        probs = logits.detach().to(dtype).softmax(dim=1)
        p_max, pred = probs.max(dim=1)
        p_y = probs.gather(1, safe.unsqueeze(1)).squeeze(1)
        disagree = pred != safe
        current_wins = disagree & (p_max > confidence.to(dtype))
        if gamma1 == 0 and gamma2 == 0:  # no dynamic weighting (DMT's ablation): plain CE
            w_pseudo = torch.ones_like(p_y)
        else:
            w_agree = p_y.pow(gamma1)
            w_other = p_y.pow(gamma2)
            w_pseudo = torch.where(disagree, torch.where(current_wins, torch.zeros_like(p_y), w_other), w_agree)
        pseudo = valid & is_pseudo.to(device=labels.device, dtype=torch.bool).view(-1, 1, 1)
        weight = torch.where(pseudo, w_pseudo, valid.float())
    return weight, valid, pseudo, disagree & pseudo, current_wins & pseudo


def dynamic_mutual_loss_with_stats(
    logits: Tensor,
    labels: Tensor,
    confidence: Tensor,
    is_pseudo: Tensor,
    gamma1: float,
    gamma2: float,
    ignore_index: int = 255,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DMT dynamic mutual loss (DMT §3) and 0-dim tensor statistics over the valid pseudo-labeled pixels.

    Args:
        logits: N×C×H×W, the current model's output.
        labels: N×H×W long, ground truth or the other model's pseudo labels; ``ignore_index`` = ignored.
        confidence: N×H×W, the other model's stored confidence of each pseudo label (unused on
            ground-truth samples).
        is_pseudo: bool (N,), which samples carry pseudo labels; the others are ground truth (weight 1).
        gamma1, gamma2: exponents of the agreement / disagreement weights.

    Returns:
        ``(loss, stats)``. ``loss = Σ w·CE / #valid`` (see the module docstring for w); with no valid pixel
        it is an exact zero that still depends on ``logits`` (backward works, gradient 0). ``stats`` holds
        ``disagree_rate`` (argmax != y), ``current_wins_rate`` (disagreement and the current max probability
        above q: w = 0 unless gamma1 = gamma2 = 0) and ``mean_weight``, each over the valid pseudo-labeled
        pixels, 0 when there are none; computed without host synchronisation.
    """
    weight, valid, pseudo, disagree, current_wins = _pixel_weights(
        logits, labels, confidence, is_pseudo, gamma1, gamma2, ignore_index
    )
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    # Ignored pixels have ce = 0 and weight 0, so an all-ignored batch gives 0 / 1 with the graph kept.
    loss = (weight * ce).sum() / valid.sum().clamp_min(1)
    with torch.no_grad():
        n_pseudo = pseudo.sum().clamp_min(1).float()
        stats = {
            "disagree_rate": disagree.sum().float() / n_pseudo,
            "current_wins_rate": current_wins.sum().float() / n_pseudo,
            "mean_weight": torch.where(pseudo, weight, torch.zeros_like(weight)).sum().float() / n_pseudo,
        }
    return loss, stats


def dynamic_mutual_loss(
    logits: Tensor,
    labels: Tensor,
    confidence: Tensor,
    is_pseudo: Tensor,
    gamma1: float,
    gamma2: float,
    ignore_index: int = 255,
) -> Tensor:
    """DMT dynamic mutual loss (DMT §3): ``Σ w·CE / #non-ignored pixels``, scalar.

    Pseudo-labeled pixels: ``w = p_y^gamma1`` if the current argmax equals y; ``0`` if it differs and the
    current max probability exceeds the other model's stored confidence q; ``p_y^gamma2`` otherwise.
    Ground-truth samples (``is_pseudo`` False) have w = 1; w carries no gradient. ``gamma1 = gamma2 = 0``:
    w = 1 everywhere (plain cross-entropy, no pixel skipped: the public DMT code's behaviour). See
    :func:`dynamic_mutual_loss_with_stats` for the arguments.
    """
    return dynamic_mutual_loss_with_stats(
        logits, labels, confidence, is_pseudo, gamma1, gamma2, ignore_index
    )[0]
