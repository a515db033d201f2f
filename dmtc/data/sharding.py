"""How a run's images are split over DDP processes, so that N devices compute what one device computes.

* **Global batches.** Training batch sizes in configs (``dataset.batch_size``, ``method.phase.labeled_batch_size``
  and ``unlabeled_batch_size``) are the protocol's global batches (DMT §4.1: 8 labeled images; 2 labeled + 6
  pseudo-labeled per phase step). Each of the ``world_size`` processes loads ``global / world_size`` of them
  per step (:func:`device_batch`), so the global batch, the steps per epoch, the poly schedule and the
  learning rates are those of one device.
* **Training shards.** Each process reads a disjoint shard of one shuffled epoch order
  (:class:`~torch.utils.data.DistributedSampler`, ``drop_last=True``: ⌊n / w⌋ items each). With per-device
  batch b / w and incomplete batches dropped, a process runs ⌊⌊n / w⌋ / (b / w)⌋ = ⌊n / b⌋ steps per epoch,
  exactly the one-device count (nested floor division).
* **Evaluation shards.** Validation gives each image to exactly one process (:class:`EvalShardSampler`:
  rank r reads images r, r + w, r + 2w, …; no padded duplicates), so the confusion matrix summed over the
  processes is the one-process matrix and the mIoU the same number.

On one device nothing changes: loaders shuffle as they always did (no sampler).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler, Sampler

from dmtc.errors import DMTCError


def device_batch(global_batch: int, world_size: int, key: str) -> int:
    """Per-device share of the global batch ``global_batch`` (config key ``key``) over ``world_size``
    processes; a :class:`DMTCError` naming the key when it does not divide evenly."""
    global_batch, world_size = int(global_batch), max(1, int(world_size))
    if global_batch % world_size:
        raise DMTCError(f"{key}={global_batch} is the global batch (the protocol's) and does not split over "
                        f"{world_size} processes: set {key} to a multiple of {world_size} or change "
                        "trainer.devices / trainer.num_nodes")
    return global_batch // world_size


def train_sampler(dataset: Sized, world_size: int, rank: int) -> DistributedSampler | None:
    """The training shard of process ``rank`` (a fresh order every epoch through Lightning's ``set_epoch``,
    seeded by ``seed_everything``'s ``PL_GLOBAL_SEED``); None on one process (the loader shuffles)."""
    if world_size <= 1:
        return None
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, drop_last=True,
                              seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))


class EvalShardSampler(Sampler[int]):
    """Images ``rank, rank + world_size, …`` of a dataset: every image read by exactly one process, in order
    (a process may get one image fewer than another, or none)."""

    def __init__(self, dataset: Sized, world_size: int, rank: int) -> None:
        self.length, self.world_size, self.rank = len(dataset), int(world_size), int(rank)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def eval_sampler(dataset: Sized, world_size: int, rank: int) -> EvalShardSampler | None:
    """The evaluation shard of process ``rank``; None on one process."""
    return EvalShardSampler(dataset, world_size, rank) if world_size > 1 else None
