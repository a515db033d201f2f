"""Class-wise memory bank of projected pixel features for the regional contrastive loss.

DMTC's ReCo loss (Liu et al., "Bootstrapping Semantic Segmentation with Regional Contrast", ICLR 2022)
draws its keys from the current batch only. :class:`ClassMemoryBank` keeps, per class, a FIFO ring of
the last ``size_per_class`` L2-normalised feature vectors seen in earlier batches, so that
:func:`dmtc.losses.reco.reco_loss` can draw negatives (and optionally prototypes) from batch ∪ bank, and a
class missing from the batch can still serve as a negative class.

* The ring lives in buffers (``features`` C×K×D, ``ptr`` C, ``count`` C): it moves with ``.to(device)``
  and is saved in ``state_dict`` / Lightning checkpoints with the module that owns it.
* ``enqueue`` is vectorised (one sort, one scatter; no loop over pixels or classes), takes at most
  ``max_per_class`` randomly chosen rows per class per call, and under ``torch.distributed`` (initialised,
  world size > 1) all-gathers every rank's bounded sample, in rank order, before writing, so every rank
  holds the same bank. **Every rank must call ``enqueue`` the same number of times** (it is a collective).
* ``size_per_class == 0`` stores nothing, and the loss then equals batch-only ReCo exactly.

Which pixels to enqueue is the caller's choice: DESIGN.md §1.6 says labeled pixels and confident
pseudo-labeled ones, i.e. the same ``valid`` mask the loss uses (see :func:`select_pixels`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClassMemoryBank", "select_pixels"]


def select_pixels(features: Tensor, labels: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Pick the pixels of a batch to enqueue: the rows of ``features`` where ``valid`` is true.

    Args:
        features: N×D×h×w projected features (any dtype; returned detached, not yet normalised).
        labels: N×h×w class ids (long), at the same h×w as ``features``.
        valid: N×h×w bool, e.g. ``labels != 255`` and, for pseudo-labeled pixels, confidence > 0.7.

    Returns:
        ``(P×D features, P labels)`` of the valid pixels, in (n, y, x) order.
    """
    if features.dim() != 4 or labels.shape != valid.shape or features.shape[2:] != labels.shape[1:] \
            or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"select_pixels expects features N×D×h×w and labels/valid N×h×w at the same size, got "
            f"{tuple(features.shape)}, {tuple(labels.shape)}, {tuple(valid.shape)}"
        )
    valid = valid.bool()
    rows = features.detach().permute(0, 2, 3, 1)[valid]
    return rows, labels[valid].long()


def _distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class ClassMemoryBank(nn.Module):
    """Per-class FIFO rings of L2-normalised features (buffers; DDP-synchronised on ``enqueue``).

    Args:
        num_classes: C.
        dim: D, the projection head's output width.
        size_per_class: K, ring length per class; 0 disables the bank (nothing is ever stored).

    Buffers:
        ``features`` (C×K×D float32), ``ptr`` (C, long; next slot to write), ``count`` (C, long; filled
        slots, ≤ K). While ``count[c] < K`` the filled slots are ``0..count[c]-1``.
    """

    features: Tensor
    ptr: Tensor
    count: Tensor

    def __init__(self, num_classes: int, dim: int, size_per_class: int) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1 or size_per_class < 0:
            raise ValueError(
                f"ClassMemoryBank needs num_classes >= 1, dim >= 1, size_per_class >= 0; got "
                f"{num_classes}, {dim}, {size_per_class}"
            )
        self.num_classes = num_classes
        self.dim = dim
        self.size_per_class = size_per_class
        self.register_buffer("features", torch.zeros(num_classes, size_per_class, dim))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, size_per_class={self.size_per_class}"

    # ------------------------------------------------------------------ reading
    def get(self, c: int) -> Tensor:
        """The stored features of class ``c``, oldest first: ``count[c]×D``."""
        n = int(self.count[c])
        if n < self.size_per_class:
            return self.features[c, :n]
        return torch.roll(self.features[c], -int(self.ptr[c]), dims=0)

    def fill(self) -> Tensor:
        """Number of stored features per class, a C-long copy of ``count``."""
        return self.count.clone()

    def stored(self) -> tuple[Tensor, Tensor]:
        """All stored features and their classes, grouped by class (ascending), in slot order.

        Returns ``(B×D, B)``; used by the loss to add the bank to the key pool.
        """
        slots = torch.arange(self.size_per_class, device=self.count.device)
        mask = slots.unsqueeze(0) < self.count.unsqueeze(1)  # C×K
        classes = torch.arange(self.num_classes, device=self.count.device)
        return self.features[mask], classes.unsqueeze(1).expand_as(mask)[mask]

    # ------------------------------------------------------------------ writing
    @torch.no_grad()
    def enqueue(
        self,
        features: Tensor,
        labels: Tensor,
        max_per_class: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Add rows to the rings (detached, L2-normalised; oldest entries overwritten).

        Args:
            features: P×D.
            labels: P class ids; rows whose label is outside ``[0, C)`` (e.g. 255) are dropped.
            max_per_class: keep at most this many rows per class from this call, chosen uniformly at random
                without replacement (order among the kept rows = input order). ``None``: no sampling — the
                call behaves like enqueuing the rows one by one (only the last K of a class survive).
            generator: for the random choice (must live on the bank's device).

        Under ``torch.distributed`` with world size > 1 each rank's bounded sample is all-gathered
        (padded to the longest rank's length, padding marked by label -1) and written in rank order, so
        all ranks end with identical banks. This is a collective: call it on every rank.
        """
        k = self.size_per_class
        if k == 0:
            return
        if features.dim() != 2 or features.shape[1] != self.dim or labels.shape != features.shape[:1]:
            raise ValueError(
                f"enqueue expects features P×{self.dim} and labels P, got {tuple(features.shape)} and "
                f"{tuple(labels.shape)}"
            )
        device = self.features.device
        feats = F.normalize(features.detach().to(device=device, dtype=self.features.dtype), dim=1)
        labels = labels.detach().to(device=device, dtype=torch.long)
        keep = (labels >= 0) & (labels < self.num_classes)
        feats, labels = feats[keep], labels[keep]

        cap = k if max_per_class is None else min(max(int(max_per_class), 0), k)
        if max_per_class is None:
            # Newest rows win, as if enqueued one by one.
            priority = torch.arange(labels.numel(), device=device, dtype=torch.float64)
        else:
            priority = torch.rand(labels.numel(), generator=generator, device=device, dtype=torch.float64)
        feats, labels = self._top_per_class(feats, labels, priority, cap)

        world = _distributed_world()
        if world > 1:
            feats, labels = self._all_gather(feats, labels, world)
        self._write(feats, labels)

    def _top_per_class(
        self, feats: Tensor, labels: Tensor, priority: Tensor, cap: int
    ) -> tuple[Tensor, Tensor]:
        """Keep the ``cap`` rows of highest priority per class; return them grouped by class, input order."""
        n = labels.numel()
        if n == 0:
            return feats, labels
        order = torch.argsort(priority, descending=True)
        order = order[torch.argsort(labels[order], stable=True)]  # by class, then by priority
        sorted_labels = labels[order]
        counts = torch.bincount(labels, minlength=self.num_classes)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(n, device=labels.device) - starts[sorted_labels]
        chosen = order[rank < cap]
        chosen, _ = torch.sort(chosen)  # input order
        chosen = chosen[torch.argsort(labels[chosen], stable=True)]
        return feats[chosen], labels[chosen]

    def _all_gather(self, feats: Tensor, labels: Tensor, world: int) -> tuple[Tensor, Tensor]:
        device = feats.device
        length = torch.tensor([labels.numel()], device=device, dtype=torch.long)
        lengths = [torch.zeros_like(length) for _ in range(world)]
        dist.all_gather(lengths, length)
        longest = int(torch.stack(lengths).max())
        pad = longest - labels.numel()
        padded_feats = torch.cat([feats, feats.new_zeros(pad, self.dim)])
        padded_labels = torch.cat([labels, labels.new_full((pad,), -1)])  # -1 marks padding
        all_feats = [torch.empty_like(padded_feats) for _ in range(world)]
        all_labels = [torch.empty_like(padded_labels) for _ in range(world)]
        dist.all_gather(all_feats, padded_feats.contiguous())
        dist.all_gather(all_labels, padded_labels.contiguous())
        feats = torch.cat(all_feats)
        labels = torch.cat(all_labels)
        real = labels >= 0
        feats, labels = feats[real], labels[real]
        order = torch.argsort(labels, stable=True)  # group by class, keep rank order within a class
        return feats[order], labels[order]

    def _write(self, feats: Tensor, labels: Tensor) -> None:
        """FIFO-write rows grouped by class (input order = age order within a class)."""
        if labels.numel() == 0:
            return
        k = self.size_per_class
        counts = torch.bincount(labels, minlength=self.num_classes)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(labels.numel(), device=labels.device) - starts[labels]
        # Only the last K rows of a class can survive; dropping the rest keeps slot indices distinct.
        survive = rank >= counts[labels] - k
        labels_s, rank_s = labels[survive], rank[survive]
        slots = (self.ptr[labels_s] + rank_s) % k
        self.features[labels_s, slots] = feats[survive]
        self.ptr.copy_((self.ptr + counts) % k)
        self.count.copy_(torch.clamp(self.count + counts, max=k))
