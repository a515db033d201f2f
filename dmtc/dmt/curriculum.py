"""DMT's class-balanced curriculum (Feng et al., Pattern Recognition 2022, §3, Algorithm 1).

In phase k each class c keeps only the most confident fraction ``r_k`` of the pixels predicted as c; the
rest become 255. Instead of re-running the model for every ratio, labeling fills one per-class histogram of
confidence scores (:class:`ConfidenceHistogram`, scores of :mod:`dmtc.dmt.scores`); thresholds for any
ratio come from it, and the phase's dataset applies ``label[s < t[label]] = 255`` at load time
(:func:`apply_thresholds`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from dmtc.data.layouts import IGNORE_INDEX
from dmtc.dmt.scores import _DECODE, CODE_MAX, code_to_score, to_numpy


class ConfidenceHistogram:
    """Per-class histograms of the confidence score of the pixels predicted as each class (DMT §3 curriculum).

    Scores are ``s = -log(1 - p)`` (module docstring); ranking by s is ranking by confidence p.
    ``counts[c, b]`` = pixels with argmax c and score in bin b = ``[edges[b], edges[b+1])`` where edges are
    the decoded scores of codes evenly spaced over 0..65535 (float32; with the default ``bins = 65536``,
    exactly the store's decoding table); the last bin holds s >= SCORE_MAX. Binning compares against the
    same float32 edges :meth:`thresholds` returns, so "s >= t_c" selects exactly whole bins.

    The default bins give every stored 16-bit code its own bin: thresholds are then the exact order
    statistics of the stored scores. Coarser bins bound the threshold error by one bin. Memory: C × bins
    int64 (10 MB for 19 classes).

    The counts may live on the labeling device (:meth:`to`): :meth:`update` then runs there without a host
    synchronisation (no ``bincount``, whose CUDA kernel reads its input's maximum back, and no boolean
    indexing). Thresholds and the store read them on the CPU.
    """

    def __init__(self, num_classes: int, bins: int = CODE_MAX + 1) -> None:
        if num_classes < 1 or bins < 2:
            raise ValueError(f"need num_classes >= 1 and bins >= 2, got {num_classes}, {bins}")
        self.num_classes = num_classes
        self.bins = bins
        self.counts = torch.zeros(num_classes, bins, dtype=torch.int64)
        codes = np.arange(bins, dtype=np.float64) * (CODE_MAX / (bins - 1))
        self.edges = torch.from_numpy(_DECODE.copy() if bins == CODE_MAX + 1 else code_to_score(codes))
        self._inner_edges: dict[torch.device, Tensor] = {}

    def to(self, device: torch.device | str) -> ConfidenceHistogram:
        """Move the counts to ``device`` (in place; returns ``self``)."""
        self.counts = self.counts.to(device)
        return self

    def update(self, labels: Tensor, score: Tensor) -> None:
        """Add pixels (any shape, e.g. N×H×W argmax labels and their scores): one accumulating scatter of
        ``labels · bins + bin(score)`` into the counts, on the pixels' device.

        Labels outside ``[0, num_classes)`` (e.g. -1 or 255 for padding) are skipped (they add 0).
        """
        conf = score.reshape(-1).float()
        edges = self._inner_edges.get(conf.device)
        if edges is None:
            edges = self._inner_edges.setdefault(conf.device, self.edges[1:].to(conf.device))
        self._add(labels, torch.bucketize(conf, edges, right=True))  # bin = number of inner edges <= conf

    def update_codes(self, labels: Tensor, codes: Tensor) -> None:
        """:meth:`update` for pixels whose scores are the store's 16-bit codes (``quantize_score``'s ``code``):
        with one bin per code (the default ``bins``) a code is its bin, so the search over the bin edges is
        skipped; the counts are those :meth:`update` gives for the decoded scores (the decoding table is
        strictly increasing)."""
        if self.bins != CODE_MAX + 1:
            raise ValueError(f"update_codes needs one bin per code ({CODE_MAX + 1} bins), this histogram has "
                             f"{self.bins}: use update() with the decoded scores")
        self._add(labels, codes.reshape(-1).long())

    def _add(self, labels: Tensor, bin_idx: Tensor) -> None:
        labels = labels.reshape(-1).long()
        keep = (labels >= 0) & (labels < self.num_classes)
        flat = torch.where(keep, labels * self.bins + bin_idx, 0)
        ones = keep.long()  # a skipped pixel adds 0 (to bin 0 of class 0)
        if self.counts.device != flat.device:
            flat, ones = flat.to(self.counts.device), ones.to(self.counts.device)
        self.counts.view(-1).index_put_((flat,), ones, accumulate=True)

    def merge(self, other: ConfidenceHistogram) -> None:
        """Add another histogram's counts (same classes and bins)."""
        if other.counts.shape != self.counts.shape:
            raise ValueError(f"cannot merge histograms of shapes {tuple(other.counts.shape)} and "
                             f"{tuple(self.counts.shape)}")
        self.counts += other.counts.to(self.counts.device)

    def all_reduce(self) -> None:
        """Sum the counts over torch.distributed ranks (no-op when not initialised). Call once."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        counts = self.counts.to(device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        self.counts = counts.cpu()

    def predicted(self) -> Tensor:
        """Pixels predicted as each class, (C,) int64."""
        return self.counts.sum(dim=1)

    def thresholds(self, ratio: float) -> Tensor:
        """Class-balanced score thresholds (C,) float32 keeping the top ``ratio`` of each class's pixels.

        Let n_c be the pixels predicted as c and k_c = ceil(ratio·n_c) (at least 1). t_c is the lower edge
        of the highest bin b with ``Σ_{j>=b} counts[c, j] >= k_c``, so, for scores binned here:

        * kept_c = #(s >= t_c) satisfies ``k_c <= kept_c < k_c + counts[c, b]``: never fewer than the
          requested fraction, more by less than the mass of one bin;
        * the exact order statistic (k_c-th largest score) lies in ``[t_c, next edge)``; with the
          default bins and stored (quantised) scores it equals t_c, and kept_c exceeds k_c only by pixels
          tied with it. In confidence units the threshold is ``score_to_confidence(t_c)``.

        ``ratio >= 1`` gives t_c = 0 (keep all). A class nobody predicted gets ``inf`` (keeps nothing;
        no pixel carries that label anyway). ``ratio`` must be in (0, 1].
        """
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        n = self.predicted()
        if ratio >= 1.0:
            t = torch.zeros(self.num_classes, dtype=torch.float32)
        else:
            # The 1e-9 absorbs float error such as 0.7 * 10 = 7.000000000000001 (at worst k_c is one pixel
            # off the exact ceil, on the side of keeping more).
            k = torch.ceil(ratio * n.double() - 1e-9).long().clamp_min(1)
            suffix = self.counts.flip(1).cumsum(1).flip(1)
            b = (suffix >= k[:, None]).sum(1) - 1  # suffix is non-increasing in b
            t = self.edges[b.clamp_min(0)]
        return torch.where(n > 0, t, torch.full_like(t, math.inf))

    def kept(self, thresholds: Tensor) -> Tensor:
        """Pixels per class with score >= t_c, (C,) int64.

        Exact for thresholds returned by :meth:`thresholds` (bin edges, 0 or inf); for other values it
        counts the bins whose lower edge is >= t_c (a lower bound).
        """
        t = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1, 1)
        return (self.counts * (self.edges[None, :] >= t)).sum(dim=1)

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors: ``{"counts": C×bins int64}``."""
        return {"counts": self.counts.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        counts = torch.as_tensor(np.asarray(state["counts"])).long()
        if counts.shape != self.counts.shape:
            raise ValueError(f"histogram counts of shape {tuple(counts.shape)}, expected "
                             f"{tuple(self.counts.shape)}")
        self.counts = counts.clone()

    @classmethod
    def from_counts(cls, counts: Tensor | np.ndarray) -> ConfidenceHistogram:
        """A histogram from a C×bins count array (e.g. loaded from a store)."""
        counts = torch.as_tensor(np.asarray(counts)).long()
        hist = cls(counts.shape[0], counts.shape[1])
        hist.counts = counts.clone()
        return hist


def apply_thresholds(
    label: np.ndarray | Tensor,
    score: np.ndarray | Tensor,
    thresholds: Sequence[float] | np.ndarray | Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray | Tensor:
    """DMT curriculum at load time: a copy of ``label`` with ``label[s < t[label]] = ignore_index``.

    ``score`` and ``thresholds`` are in the same unit (the store's scores and :meth:`ConfidenceHistogram.
    thresholds`; any monotone unit works). Works on numpy arrays or torch tensors (returns the same kind);
    labels already equal to ``ignore_index`` stay so. Compared as float32, like the histogram's edges.
    """
    t = to_numpy(thresholds).astype(np.float32).reshape(-1)
    if isinstance(label, Tensor):
        t_torch = torch.from_numpy(t).to(label.device)
        s = torch.as_tensor(score, device=label.device).float()
        valid = label != ignore_index
        drop = valid & (s < t_torch[torch.where(valid, label, torch.zeros_like(label)).long()])
        return label.masked_fill(drop, ignore_index)
    label = np.asarray(label)
    valid = label != ignore_index
    drop = valid & (to_numpy(score).astype(np.float32) < t[np.where(valid, label, 0)])
    out = label.copy()
    out[drop] = ignore_index
    return out
