"""The DataLoader options every dmtc loader shares (training, DMT phases, validation, labeling, evaluation).

* ``pin_memory`` when CUDA is available: batches are collated into page-locked memory by the loader's pin
  thread, so the copy to the GPU is asynchronous (``non_blocking=True``: Lightning's batch transfer,
  labeling and evaluation) and overlaps the previous step's kernels;
* ``persistent_workers`` with workers: a loader iterated again (every epoch, every validation) keeps its
  worker processes instead of starting new ones (no effect on a loader read once);
* ``prefetch_factor`` with workers (``dataset.prefetch_factor``; PyTorch's default 2): batches each worker
  prepares ahead, so a slow sample or a validation does not leave the device waiting.

None of them changes what a loader yields or in which order.
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_PREFETCH = 2
"""Batches each worker loads ahead when ``dataset.prefetch_factor`` is not set (PyTorch's default)."""


def loader_options(num_workers: int, *, prefetch_factor: int | None = None, persistent: bool = True) -> dict[str, Any]:
    """``DataLoader`` keyword arguments for ``num_workers`` worker processes: ``num_workers``, ``pin_memory``
    (CUDA available) and, with workers, ``persistent_workers`` (``persistent``) and ``prefetch_factor``
    (default :data:`DEFAULT_PREFETCH`). PyTorch refuses the last two without workers, so they are left out."""
    workers = max(0, int(num_workers))
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": torch.cuda.is_available()}
    if workers > 0:
        options["persistent_workers"] = bool(persistent)
        options["prefetch_factor"] = max(1, int(prefetch_factor or DEFAULT_PREFETCH))
    return options
