"""ReCo's sampling step: anchors, prototypes and negative keys as indices (:class:`RecoSample`).

ReCo: Liu, Zhi, Johns, Davison, "Bootstrapping Semantic Segmentation with Regional Contrast", ICLR 2022.
The loss itself, and the full definition of what is drawn here (pixels, prototypes, queries, negatives),
is in :mod:`dmtc.losses.reco`, which re-exports every public name of this module; import them from there.

:func:`sample_reco` is a short sequence of steps, each a private function below, in this order:

1. :func:`_valid_pixels` — the valid pixels, their labels and the probability of their own label;
2. :func:`_bank_view` — the memory bank's filled slots (member r of class c is slot c·K + r);
3. :func:`_pixel_major` — one pixel-major float32 copy of the features and 1/‖f_i‖ per pixel;
4. :func:`_prototypes` — ``p_c = normalise(Σ_{valid i of class c} f_i/‖f_i‖)`` (batch, or batch ∪ bank);
5. :func:`_negative_class_probs` — ``P(k | c) = softmax_{k ≠ c present}(cos(p_c, p_k) / τ)``;
6. :func:`_draw_anchors` — Q anchors per class, uniform with replacement among its hard pixels;
7. :func:`_draw_negatives` — a class k ~ P(k | c), then a uniform member of k (batch pixel or bank entry).

Random numbers are drawn only in steps 6 and 7, in a fixed order (anchors, negative classes, negative
members), with shapes that do not depend on the bank's content.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dmtc.losses.memory_bank import ClassMemoryBank

__all__ = ["RecoSample", "gather_keys", "sample_reco"]


@dataclass(frozen=True)
class RecoSample:
    """One draw of ReCo's anchors and keys, as indices (all tensors on the features' device).

    Keys are addressed in one index space: ``i < N·h·w`` is the flat pixel ``n·h·w + y·w + x`` of the
    batch, ``i ≥ N·h·w`` is slot ``i - N·h·w`` of the memory bank's ``features`` viewed as (C·K)×D
    (so its class is ``(i - N·h·w) // K``). :func:`gather_keys` turns indices into unit vectors.

    Attributes:
        num_classes_present: K, the loss denominator (classes present among valid batch pixels).
        anchor_class: (A,) class ids of the present classes that have hard anchors (A ≤ K).
        anchor_index: (A, Q) flat pixel indices of the anchors.
        positive: (A, D) unit prototypes of the anchor classes (no gradient).
        negative_index: key indices; (A, M) when shared by a class's queries, (A, Q, M) when exact.
        key_pixels: (P,) flat indices of the valid batch pixels (the batch part of the key pool).
        bank_slots: (B,) filled bank slots (the bank part of the key pool, offset by N·h·w in indices).
        pixel_features: (N·h·w)×D float32 detached copy of the features, pixel-major (rows gather fast).
        pixel_inv_norm: (N·h·w,) 1 / max(‖f‖, 1e-12) per pixel.
        bank_features: (C·K)×D view of the bank (0×D without one).
        bank_size_per_class: K (0 without a bank).
    """

    num_classes_present: int
    anchor_class: Tensor
    anchor_index: Tensor
    positive: Tensor
    negative_index: Tensor
    key_pixels: Tensor
    bank_slots: Tensor
    pixel_features: Tensor
    pixel_inv_norm: Tensor
    bank_features: Tensor
    bank_size_per_class: int


class _BankView(NamedTuple):
    """The memory bank as the sampler sees it, on the features' device.

    Member r of class c is slot ``c·K + r`` of ``features``; the filled slots of a class are 0..count-1.
    """

    size_per_class: int  # K (0 without a bank)
    features: Tensor  # (C·K)×D (0×D without a bank)
    count: Tensor  # (C,) filled entries per class
    filled: Tensor  # C×K bool, slot r of class c is filled
    slots: Tensor  # (B,) flat indices of the filled slots


def _check_inputs(features: Tensor, labels: Tensor, valid: Tensor, probs: Tensor) -> None:
    """Raise ``ValueError`` unless features are N×D×h×w and labels, valid (N×h×w), probs (N×C×h×w) match."""
    if features.dim() != 4:
        raise ValueError(f"features must be N×D×h×w, got {tuple(features.shape)}")
    n, _, h, w = features.shape
    if labels.shape != (n, h, w) or valid.shape != (n, h, w):
        raise ValueError(
            f"labels and valid must be N×h×w = {(n, h, w)} (the features' size; see downsample_nearest), "
            f"got {tuple(labels.shape)} and {tuple(valid.shape)}"
        )
    if probs.dim() != 4 or probs.shape[0] != n or probs.shape[2:] != (h, w):
        raise ValueError(f"probs must be N×C×h×w with N, h, w = {(n, h, w)}, got {tuple(probs.shape)}")


def _sample_categorical(probs: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
    """``num_samples`` i.i.d. draws per row of a row-stochastic (R×C) matrix, by inverse CDF in float64."""
    cdf = torch.cumsum(probs.double(), dim=1)
    u = torch.rand(probs.shape[0], num_samples, generator=generator, device=probs.device, dtype=torch.float64)
    u = u * cdf[:, -1:]
    draws = torch.searchsorted(cdf, u, right=True)  # first class whose cdf exceeds u (skips p = 0)
    columns = torch.arange(probs.shape[1], device=probs.device)
    last_allowed = torch.where(probs > 0, columns, -1).amax(dim=1, keepdim=True)
    return torch.minimum(draws, last_allowed)  # guards u rounding up to the total


def _uniform_below(counts: Tensor, generator: torch.Generator | None) -> Tensor:
    """A uniform integer in ``[0, counts)`` per element (0 where counts == 0)."""
    u = torch.rand(counts.shape, generator=generator, device=counts.device, dtype=torch.float64)
    draws = torch.floor(u * counts).long()
    return torch.minimum(draws, (counts - 1).clamp_min(0))


@torch.no_grad()
def gather_keys(sample: RecoSample, index: Tensor) -> Tensor:
    """Unit-norm key vectors (float32, no gradient) for key indices of any shape S → S×D."""
    num_pixels = sample.pixel_features.shape[0]
    if sample.bank_slots.numel() == 0:  # batch only: every index is a pixel
        flat = index.reshape(-1)
        rows = sample.pixel_features.index_select(0, flat).mul_(sample.pixel_inv_norm[flat].unsqueeze(1))
        return rows.view(*index.shape, -1)
    in_bank = index >= num_pixels
    pixel_index = torch.where(in_bank, 0, index)
    pixel = sample.pixel_features[pixel_index] * sample.pixel_inv_norm[pixel_index].unsqueeze(-1)
    bank = sample.bank_features[torch.where(in_bank, index - num_pixels, 0)].float()
    return torch.where(in_bank.unsqueeze(-1), bank, pixel)


def _valid_pixels(labels: Tensor, valid: Tensor, probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The pixels that take part in ReCo: ``(pix, lab, own_prob)``.

    ``pix`` are the flat indices ``n·h·w + y·w + x`` of the valid pixels (ascending), ``lab`` their labels
    (long, checked to lie in ``[0, C)``) and ``own_prob = probs[n, lab, y, x]`` (detached), which decides
    whether a pixel is a hard anchor.
    """
    num_classes = probs.shape[1]
    hw = labels.shape[1] * labels.shape[2]
    pix = valid.bool().reshape(-1).nonzero().squeeze(1)  # flat indices of valid pixels, ascending
    lab = labels.reshape(-1)[pix].long()
    if bool(((lab < 0) | (lab >= num_classes)).any()):  # one host sync for the check, not two
        raise ValueError(
            f"valid pixels must have labels in [0, {num_classes}); got {int(lab.min())}..{int(lab.max())} "
            "(mark ignored pixels, e.g. 255, as not valid)"
        )
    own_prob = probs.detach().flatten(2)[pix // hw, lab, pix % hw]
    return pix, lab, own_prob


def _bank_view(memory: ClassMemoryBank | None, num_classes: int, dim: int, device: torch.device) -> _BankView:
    """The memory bank's features as (C·K)×D, its per-class counts and filled slots (an empty view without
    a bank: K = 0, no slots); raises if the bank's classes or dims differ from the loss's."""
    if memory is not None:
        if memory.num_classes != num_classes or memory.dim != dim:
            raise ValueError(
                f"memory bank is {memory.num_classes} classes × {memory.dim} dims, the loss got "
                f"{num_classes} classes × {dim} dims"
            )
        bank_k = memory.size_per_class
        bank_features = memory.features.to(device).reshape(num_classes * bank_k, dim)
        n_bank = memory.count.to(device)
    else:
        bank_k = 0
        bank_features = torch.zeros(0, dim, device=device)
        n_bank = torch.zeros(num_classes, dtype=torch.long, device=device)
    filled = torch.arange(bank_k, device=device).unsqueeze(0) < n_bank.unsqueeze(1)  # C×K
    bank_slots = filled.reshape(-1).nonzero().squeeze(1)
    return _BankView(bank_k, bank_features, n_bank, filled, bank_slots)


def _pixel_major(features: Tensor) -> tuple[Tensor, Tensor]:
    """One pixel-major float32 detached copy of N×D×h×w ``features``, as (N·h·w)×D (fast row gathers for
    prototypes and keys), and ``1 / max(‖f_i‖, 1e-12)`` per pixel."""
    n, dim, h, w = features.shape
    pixel_features = torch.empty(n, h, w, dim, device=features.device)
    pixel_features.copy_(features.detach().permute(0, 2, 3, 1))
    pixel_features = pixel_features.view(n * h * w, dim)
    pixel_inv_norm = 1.0 / torch.linalg.vector_norm(pixel_features, dim=1).clamp_min(1e-12)
    return pixel_features, pixel_inv_norm


def _prototypes(
    pixel_features: Tensor,
    pixel_inv_norm: Tensor,
    pix: Tensor,
    lab: Tensor,
    n_batch: Tensor,
    bank: _BankView,
    bank_prototypes: bool,
    raw_prototypes: bool,
) -> Tensor:
    """Unit class prototypes, C×D: ``p_c = normalise(Σ_{valid i of class c} f_i/‖f_i‖)``.

    The batch sum is one matmul of a C×(N·h·w) weight matrix (1/‖f_i‖ at (label_i, i), 0 elsewhere; 1
    with ``raw_prototypes``, the raw features' mean as in ReCo/DMTC) with the features. With
    ``bank_prototypes`` the sum runs over batch ∪ bank entries of the class; otherwise over the batch,
    and classes absent from the batch use their bank mean.
    """
    num_classes, dim = n_batch.shape[0], pixel_features.shape[1]
    weight = torch.zeros(num_classes, pixel_features.shape[0], device=pixel_features.device)
    weight[lab, pix] = 1.0 if raw_prototypes else pixel_inv_norm[pix]  # ReCo/DMTC: the raw features' mean
    sum_batch = weight @ pixel_features  # C×D
    if bank.slots.numel():
        bank_cube = bank.features.view(num_classes, bank.size_per_class, dim).float()
        sum_bank = torch.einsum("ck,ckd->cd", bank.filled.float(), bank_cube)
    else:
        sum_bank = torch.zeros_like(sum_batch)
    if bank_prototypes:
        return F.normalize(sum_batch + sum_bank, dim=1)
    return F.normalize(torch.where((n_batch > 0).unsqueeze(1), sum_batch, sum_bank), dim=1)


def _negative_class_probs(proto: Tensor, present: Tensor, n_all: Tensor, temperature: float) -> Tensor:
    """Negative-class distribution, K×C: ``P(k | c) = softmax_k(cos(p_c, p_k) / τ)`` for each query class
    c in ``present``, over the classes k ≠ c with members in batch ∪ bank (``n_all > 0``); 0 elsewhere."""
    classes = torch.arange(proto.shape[0], device=proto.device)
    allowed = (n_all > 0).unsqueeze(0) & (classes.unsqueeze(0) != present.unsqueeze(1))
    sim = (proto[present] @ proto.T) / temperature
    return torch.softmax(sim.masked_fill(~allowed, float("-inf")), dim=1)


def _draw_anchors(
    pix: Tensor,
    lab: Tensor,
    own_prob: Tensor,
    present: Tensor,
    num_classes: int,
    strong_threshold: float,
    num_queries: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hard anchors: Q draws, uniform with replacement, among each present class's hard valid pixels
    (``own_prob < strong_threshold``); one K×Q uniform draw, also for classes without hard pixels.

    Returns ``(anchor_index, anchor_class, has_anchor)``: (A, Q) flat pixel indices, the A classes with
    hard pixels, and the (K,) mask of those classes among ``present``.
    """
    hard = own_prob < strong_threshold
    hard_lab = lab[hard]
    hard_pix = pix[hard][torch.argsort(hard_lab, stable=True)]
    hard_counts = torch.bincount(hard_lab, minlength=num_classes)
    n_hard = hard_counts[present]
    start_hard = (torch.cumsum(hard_counts, 0) - hard_counts)[present]
    pick = _uniform_below(n_hard.unsqueeze(1).expand(-1, num_queries), generator)
    has_anchor = n_hard > 0
    anchor_index = hard_pix[(start_hard.unsqueeze(1) + pick)[has_anchor]]
    return anchor_index, present[has_anchor], has_anchor


def _draw_negatives(
    neg_class_prob: Tensor,
    pix: Tensor,
    lab: Tensor,
    n_batch: Tensor,
    n_all: Tensor,
    num_pixels: int,
    bank_size_per_class: int,
    num_samples: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Negative key indices, (A, num_samples): per row, a class k ~ ``neg_class_prob`` (A×C, by inverse
    CDF), then a uniform member r of k among its batch pixels ∪ bank entries — the r-th valid pixel of
    class k (in pixel order) if r < n_batch[k], else bank slot ``k·K + r - n_batch[k]``, offset by
    ``num_pixels`` = N·h·w (see :class:`RecoSample`'s index space).
    """
    neg_class = _sample_categorical(neg_class_prob, num_samples, generator)
    member = _uniform_below(n_all[neg_class], generator)
    nb = n_batch[neg_class]
    batch_sorted = pix[torch.argsort(lab, stable=True)]
    start_batch = torch.cumsum(n_batch, 0) - n_batch
    in_batch = member < nb
    return torch.where(
        in_batch,
        batch_sorted[torch.where(in_batch, start_batch[neg_class] + member, 0)],
        num_pixels + neg_class * bank_size_per_class + (member - nb),
    )


@torch.no_grad()
def sample_reco(
    features: Tensor,
    labels: Tensor,
    valid: Tensor,
    probs: Tensor,
    strong_threshold: float = 0.97,
    temperature: float = 0.5,
    num_queries: int = 256,
    num_negatives: int = 512,
    memory: ClassMemoryBank | None = None,
    shared_negatives: bool = True,
    generator: torch.Generator | None = None,
    bank_prototypes: bool = False,
    raw_prototypes: bool = False,
) -> RecoSample | None:
    """Draw ReCo's anchors and negative keys (see :mod:`dmtc.losses.reco`); ``None`` when the loss is 0.

    Random numbers are drawn in a fixed order (anchors, negative classes, negative members) with shapes
    that do not depend on the bank's content, so an empty bank reproduces batch mode exactly.
    ``features`` must be finite everywhere (ignored pixels get weight 0 in a matmul, and 0·inf = NaN).

    Host synchronisations (on CUDA, ~11 per call, i.e. per model and DMTC step; needed: the sets drawn from
    have data-dependent sizes): the valid pixels' ``nonzero``, the label-range check, the bank's filled
    slots' ``nonzero``, two ``bincount`` (CUDA reads the maximum back), the present classes' ``nonzero``, the
    count of key classes (the early return), and the hard-anchor selection (boolean indexing, four times).
    """
    _check_inputs(features, labels, valid, probs)
    num_classes = probs.shape[1]
    pix, lab, own_prob = _valid_pixels(labels, valid, probs)
    bank = _bank_view(memory, num_classes, features.shape[1], features.device)

    n_batch = torch.bincount(lab, minlength=num_classes)
    n_all = n_batch + bank.count
    present = (n_batch > 0).nonzero().squeeze(1)  # the query classes
    if present.numel() == 0 or int((n_all > 0).sum()) < 2:
        return None

    pixel_features, pixel_inv_norm = _pixel_major(features)
    proto = _prototypes(pixel_features, pixel_inv_norm, pix, lab, n_batch, bank, bank_prototypes, raw_prototypes)
    neg_class_prob = _negative_class_probs(proto, present, n_all, temperature)
    anchor_index, anchor_class, has_anchor = _draw_anchors(
        pix, lab, own_prob, present, num_classes, strong_threshold, num_queries, generator
    )
    per_class = num_negatives if shared_negatives else num_queries * num_negatives
    num_pixels = pixel_features.shape[0]  # N·h·w: bank keys are indexed from here on
    negative_index = _draw_negatives(
        neg_class_prob[has_anchor], pix, lab, n_batch, n_all, num_pixels, bank.size_per_class, per_class, generator
    )
    if not shared_negatives:
        negative_index = negative_index.view(-1, num_queries, num_negatives)

    return RecoSample(
        num_classes_present=int(present.numel()),
        anchor_class=anchor_class,
        anchor_index=anchor_index,
        positive=proto[anchor_class],
        negative_index=negative_index,
        key_pixels=pix,
        bank_slots=bank.slots,
        pixel_features=pixel_features,
        pixel_inv_norm=pixel_inv_norm,
        bank_features=bank.features,
        bank_size_per_class=bank.size_per_class,
    )
