"""Regional contrastive loss (ReCo) as used by DMTC, vectorised, with an optional class-wise memory bank.

ReCo: Liu, Zhi, Johns, Davison, "Bootstrapping Semantic Segmentation with Regional Contrast", ICLR 2022.
DMTC applies it on a projection head's features next to the dynamic mutual loss (weight 1.0 in warm-up,
0.1 in the DMT phases; strong_threshold 0.97, τ = 0.5, 256 queries, 512 negatives; DESIGN.md §1.5, §3).

The loss, for features ``f`` (L2-normalised along D, so every dot product below is a cosine):

* **Pixels.** Only pixels with ``valid`` true take part, as anchors, positives, negatives or in prototypes.
  The caller builds ``valid``: ``labels != 255`` and, for pseudo-labeled pixels, optionally the pseudo
  label's confidence > weak threshold (0.7 in ReCo). (The DMTC reference code lets label 255 in as class 0;
  this implementation never looks at an invalid pixel.)
* **Prototypes.** ``p_c = normalise(mean_{valid i of class c} f_i)`` — the mean of the *normalised*
  features (ReCo averages the raw head outputs; we normalise first so that batch features and the memory
  bank's unit vectors can be averaged together; ``raw_prototypes=True`` averages the raw batch features as
  ReCo/DMTC do). With a bank and ``bank_prototypes=True`` the mean runs
  over batch ∪ bank features of the class; otherwise over the batch (bank-only classes use the bank mean).
* **Queries.** For every class c present among valid batch pixels, Q anchors ``q`` are drawn uniformly
  *with replacement* among c's hard pixels: valid, labeled c, with ``probs[c] < strong_threshold``.
* **Negatives.** For a query of class c each of the M negatives is drawn i.i.d.: first a class k ≠ c with
  probability ``P(k | c) = softmax_k(cos(p_c, p_k) / τ)`` over the other classes present (in the batch,
  or in batch ∪ bank with a memory bank), then a uniform valid pixel (or bank entry) of class k.
* **Loss.** Keys (prototype and negatives) carry no gradient. Per query, InfoNCE / cross-entropy with the
  positive at index 0::

      ℓ(q) = -log( exp(q·p_c / τ) / (exp(q·p_c / τ) + Σ_m exp(q·n_m / τ)) )

  and ``L = (1 / K) Σ_c mean_q ℓ(q)`` where K = number of classes present among valid batch pixels; a
  class without hard anchors adds 0 but still counts in K. ``L = 0`` (with a zero gradient path to
  ``features``) when fewer than two key classes are present (batch, or batch ∪ bank) or no pixel is valid.

``shared_negatives=True`` draws one set of M negatives per class and lets all of that class's queries use
it: each query still sees M i.i.d. negatives from the same distribution, so the expected loss and gradient
equal those of the exact mode, while the cost drops from a Q×M×D gather to an (M×D) gather and a batched
matmul. ``shared_negatives=False`` is ReCo's exact per-query sampling (cost ∝ Q·P_keys·D: it computes the
queries' similarities to the whole key pool in memory-bounded chunks and picks the sampled entries).

Resolution: the loss works at whatever resolution it is given. ReCo computes it at feature resolution
(labels, valid and probs resized with nearest neighbour — :func:`downsample_nearest`); DMTC's variant
instead upsamples the features to crop resolution, which is much more expensive.

Sampling is a separate step (:func:`sample_reco` → :class:`RecoSample` of indices) so tests can evaluate
the same draw two ways; :func:`reco_loss` = :func:`sample_reco` + :func:`reco_loss_from_sample`. The
sampling lives in :mod:`dmtc.losses.reco_sampling` and is re-exported here (import it from this module).

Usage in a training step (one bank shared by the step, kept on the features' device)::

    feats = proj_head(x)                                    # N×D×h×w
    lab, ok, p = downsample_nearest(labels, valid, probs, feats.shape[2:])
    loss = reco_loss(feats, lab, ok, p, memory=bank)        # keys from batch ∪ bank
    bank.enqueue(*select_pixels(feats, lab, ok), max_per_class=...)   # after the loss: no self-keys

Implementation notes: no Python loop over pixels, queries or classes (per-class index ranges come from
sorting by class, draws from float64 uniforms: inverse-CDF for classes, ``floor(u·count)`` for members;
only the exact mode loops over blocks of queries to bound memory);
the shared mode's InfoNCE has a hand-written backward so its A×Q×M block is made once (used for τ ≥ 0.05,
where |logit| ≤ 1/τ ≤ 20 needs no max-shift; smaller τ takes a logsumexp path). A few ``int(...)``
reads of small tensors and the data-dependent selections synchronise with a GPU (~11 per call, listed in
:func:`~dmtc.losses.reco_sampling.sample_reco`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from dmtc.losses.reco_sampling import RecoSample, gather_keys, sample_reco

__all__ = [
    "RecoSample",
    "downsample_nearest",
    "gather_keys",
    "reco_loss",
    "reco_loss_from_sample",
    "sample_reco",
]

# Exact mode computes query-by-key similarity blocks of at most this many elements (64 MiB in float32).
_EXACT_BLOCK_ELEMENTS = 1 << 24


def downsample_nearest(
    labels: Tensor, valid: Tensor, probs: Tensor, size: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Resize labels (N×H×W), valid (N×H×W) and probs (N×C×H×W) to ``size`` = (h, w), nearest neighbour.

    All three use the same nearest-neighbour pixel choice (``F.interpolate(mode="nearest")``, as ReCo
    does), so a kept label, its validity and its probabilities come from the same source pixel.
    """
    size = (int(size[0]), int(size[1]))
    small_labels = F.interpolate(labels.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1)
    small_valid = F.interpolate(valid.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1)
    small_probs = F.interpolate(probs, size=size, mode="nearest")
    return small_labels.round().to(labels.dtype), small_valid > 0.5, small_probs


def _zero_with_grad_path(features: Tensor) -> Tensor:
    """An exact 0 connected to ``features`` (zero gradient, never NaN, keeps DDP's graph complete)."""
    return features[..., :0].sum().float()


class _SharedInfoNCE(torch.autograd.Function):
    """Per-query ``log(exp(q·p) + Σ_m exp(q·n_m)) - q·p`` for queries already scaled by 1/τ.

    q: A×Q×D (grad), p: A×D, n: A×M×D (no grad). Hand-written backward so that the A×Q×M block is made
    once (bmm, exp in place) and read twice (sum, backward bmm): no extra passes or temporaries. Needs
    |q·k| ≤ 1/τ ≤ 20 (unit vectors, τ ≥ 0.05) so that no max-shift is needed.
    """

    @staticmethod
    def forward(ctx, q: Tensor, pos_key: Tensor, neg_keys: Tensor) -> Tensor:  # noqa: ANN001
        pos = torch.bmm(q, pos_key.unsqueeze(2)).squeeze(2)  # A×Q
        neg_exp = torch.bmm(q, neg_keys.transpose(1, 2)).exp_()  # A×Q×M
        pos_exp = pos.exp()
        total = neg_exp.sum(dim=2) + pos_exp
        ctx.save_for_backward(pos_key, neg_keys, neg_exp, pos_exp, total)
        return total.log() - pos

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        pos_key, neg_keys, neg_exp, pos_exp, total = ctx.saved_tensors
        scale = grad / total  # d/dlogit_m = exp(logit_m) / total
        grad_q = torch.bmm(neg_exp, neg_keys) * scale.unsqueeze(2)
        grad_q += (scale * pos_exp - grad).unsqueeze(2) * pos_key.unsqueeze(1)
        return grad_q, None, None


class _AnchorRows(torch.autograd.Function):
    """Anchor rows read from the sample's pixel-major copy (a fast contiguous gather), with the gradient
    scattered back into ``features``' N×D×h×w layout (accumulating over repeated anchors)."""

    @staticmethod
    def forward(ctx, features: Tensor, pixel_features: Tensor, index: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(index)
        ctx.shape, ctx.dtype = features.shape, features.dtype
        return pixel_features.index_select(0, index.reshape(-1)).view(*index.shape, -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        (index,) = ctx.saved_tensors
        n, dim, h, w = ctx.shape
        flat = index.reshape(-1)
        rows = grad.reshape(-1, dim).to(ctx.dtype)
        if grad.device.type == "cpu":
            # pixel-major rows, summed by index_add_ (~20x faster on a CPU than an accumulating index_put_),
            # returned as an N×D×h×w view: channels_last strides, the layout of the features of a
            # channels_last model
            out = torch.zeros(n * h * w, dim, dtype=ctx.dtype, device=grad.device).index_add_(0, flat, rows)
            return out.view(n, h, w, dim).permute(0, 3, 1, 2), None, None
        # CUDA: the accumulating index_put_ is deterministic (index_add_'s atomics are not)
        out = torch.zeros(n, dim, h * w, dtype=ctx.dtype, device=grad.device)
        out.transpose(1, 2).index_put_((flat // (h * w), flat % (h * w)), rows, accumulate=True)
        return out.view(n, dim, h, w), None, None


def _exact_negative_logits(queries: Tensor, keys: Tensor, index: Tensor) -> Tensor:
    """``queries[r] · keys[index[r, m]]`` for R×D queries and R×M indices, in memory-bounded blocks."""
    rows, per_row = index.shape
    block = max(1, _EXACT_BLOCK_ELEMENTS // max(1, keys.shape[0]))
    out = []
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        sims = queries[start:stop] @ keys.T  # (stop-start)×P_keys; freed after indexing
        row = torch.arange(stop - start, device=index.device).unsqueeze(1)
        flat = index[start:stop] + keys.shape[0] * row
        out.append(sims.reshape(-1)[flat.reshape(-1)].view(stop - start, per_row))
    return torch.cat(out)


def _exact_negative_logits_pool(sample: RecoSample, q: Tensor) -> Tensor:
    """Exact mode: each query's own M negatives, via similarities to the compacted key pool."""
    num_anchor_classes, num_queries, dim = q.shape
    num_pixels = sample.pixel_features.shape[0]
    with torch.no_grad():
        pool_index = torch.cat([sample.key_pixels, num_pixels + sample.bank_slots])
        pool = gather_keys(sample, pool_index)  # P_keys×D
        size = num_pixels + sample.bank_features.shape[0]
        lookup = torch.full((size,), -1, dtype=torch.long, device=q.device)
        lookup[pool_index] = torch.arange(pool_index.numel(), device=q.device)
        index = lookup[sample.negative_index].reshape(num_anchor_classes * num_queries, -1)
    neg = _exact_negative_logits(q.reshape(-1, dim), pool, index)
    return neg.view(num_anchor_classes, num_queries, -1)


def reco_loss_from_sample(features: Tensor, sample: RecoSample, temperature: float = 0.5) -> Tensor:
    """ReCo's InfoNCE loss for a given draw: ``(1/K) Σ_c mean_q -log softmax([q·p_c, q·n_1..M] / τ)[0]``.

    ``sample`` must come from :func:`sample_reco` on these ``features`` (anchor values are read from its
    copy of them). Gradients reach ``features`` only at the anchor pixels (keys carry no gradient).
    """
    if sample.anchor_index.numel() == 0:
        return _zero_with_grad_path(features)
    with torch.autocast(device_type=features.device.type, enabled=False):
        anchors = _AnchorRows.apply(features, sample.pixel_features, sample.anchor_index)  # A×Q×D float32
        q = anchors / (torch.linalg.vector_norm(anchors, dim=-1, keepdim=True).clamp_min(1e-12) * temperature)
        if sample.negative_index.dim() == 2 and temperature >= 0.05:
            neg_keys = gather_keys(sample, sample.negative_index)  # A×M×D
            per_query = _SharedInfoNCE.apply(q, sample.positive, neg_keys)
        else:
            pos = (q * sample.positive.unsqueeze(1)).sum(-1)  # A×Q
            if sample.negative_index.dim() == 2:
                neg = torch.bmm(q, gather_keys(sample, sample.negative_index).transpose(1, 2))
            else:
                neg = _exact_negative_logits_pool(sample, q)
            per_query = torch.logaddexp(pos, torch.logsumexp(neg, dim=-1)) - pos
        return per_query.mean(dim=1).sum() / sample.num_classes_present


def reco_loss(
    features: Tensor,
    labels: Tensor,
    valid: Tensor,
    probs: Tensor,
    *,
    temperature: float = 0.5,
    **sampling: Any,
) -> Tensor:
    """Regional contrastive loss (ReCo, Liu et al., ICLR 2022) as in DMTC; see the module docstring.

    :func:`~dmtc.losses.reco_sampling.sample_reco` draws anchors and keys with ``temperature`` and the
    ``sampling`` options (its keyword arguments, listed below), then :func:`reco_loss_from_sample` scores them.

    Args:
        features: N×D×h×w projection-head output (normalised along D inside; must be finite).
        labels: N×h×w class ids (long); only read where ``valid``.
        valid: N×h×w bool; the caller builds it: ``labels != 255`` and, for pseudo-labeled pixels,
            optionally ``confidence > 0.7`` (ReCo's weak threshold).
        probs: N×C×h×w softmax probabilities (hard anchors: ``probs[label] < strong_threshold``).
        strong_threshold, temperature, num_queries, num_negatives: ReCo's hyper-parameters
            (DMTC: 0.97, 0.5, 256, 512).
        memory: optional :class:`~dmtc.losses.memory_bank.ClassMemoryBank`; negatives come from batch ∪ bank,
            and bank-only classes can be negative classes. An empty bank gives exactly the batch-mode loss.
        shared_negatives: share a class's M negatives among its queries (default) or draw per query.
        generator: torch.Generator on the features' device for all sampling.
        bank_prototypes: prototypes from batch ∪ bank instead of the batch alone.
        raw_prototypes: prototypes from the mean of the raw (unnormalised) batch features, as ReCo/DMTC.

    Returns:
        A float32 scalar; 0 (with a zero-gradient path to ``features``) if fewer than two classes are
        present or no pixel is valid.
    """
    # Under mixed precision (autocast) the projection head's features arrive in bf16/fp16; prototypes,
    # similarities and the InfoNCE sum are computed in float32 here, as the features' pixel-major copy is.
    with torch.autocast(device_type=features.device.type, enabled=False):
        sample = sample_reco(features, labels, valid, probs.float(), temperature=temperature, **sampling)
        if sample is None:
            return _zero_with_grad_path(features)
        return reco_loss_from_sample(features, sample, temperature)
