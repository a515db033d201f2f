"""The LightningDataModule of a run: the labeled split, the validation set and, in a DMT phase, the
labeled + pseudo-labeled batches of the phase."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from dmtc.data.datasets import RepeatedDataset, SegmentationDataset
from dmtc.data.layouts import DatasetLayout
from dmtc.data.loading import loader_options
from dmtc.data.sharding import device_batch, eval_sampler, train_sampler

log = logging.getLogger(__name__)


class SegmentationDataModule(L.LightningDataModule):
    """Labeled training images (one DMT split) and the validation images of one layout.

    ``batch_size`` is the global batch of labeled images (the protocol's): under DDP each process loads its
    share from its own shard (:mod:`dmtc.data.sharding`), so steps and schedules do not depend on the device
    count; training drops the last incomplete batch (BatchNorm cannot train on a batch of one). Validation
    uses ``val_batch_size`` per device (1 when image sizes differ) and counts every image exactly once over
    the processes. Every loader pins memory for CUDA, keeps its workers and prefetches ``prefetch_factor``
    batches per worker (:func:`dmtc.data.loading.loader_options`).

    ``model_labeled`` (``{key: names}``, optional) gives each model of a pair its own labeled stream for
    training: DMT's warm-up with ``pair_init=subsets`` (Feng et al., Pattern Recognition 2022, §4.3), A on
    the difference-maximized ``-l`` subset and B on ``-r``; or the same split for both, each model shuffled
    and augmented on its own (``method.streams=independent``, as the reference trains A and B in two
    processes). :meth:`train_dataloader` then returns a ``CombinedLoader({key: loader}, mode="min_size")``
    whose batches are ``{key: batch}`` (one optimizer step each); a shorter list is repeated (and reshuffled
    as a whole) to the longest one's length rather than cycled. Model k's batches go through
    ``model_train_transforms[k]`` (its own input pipeline) when given. :meth:`train_dataset` stays the run's
    whole labeled split with the shared transform (what DMT's phases use with shared streams).

    In a DMT phase (:meth:`serve_phase`) training batches are the phase's: labeled + pseudo-labeled images
    (:mod:`dmtc.dmt.phase_data`), from a loader built for the Trainer's world size.
    """

    def __init__(
        self,
        layout: DatasetLayout,
        labeled: Sequence[str],
        val: Sequence[str],
        train_transform: Any,
        eval_transform: Any,
        *,
        batch_size: int,
        val_batch_size: int = 1,
        num_workers: int = 0,
        train_subset: str = "train",
        val_subset: str = "val",
        persistent_workers: bool = True,
        prefetch_factor: int | None = None,
        val_layout: DatasetLayout | None = None,
        model_labeled: Mapping[str, Sequence[str]] | None = None,
        model_train_transforms: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.layout = layout
        # validation may read other files than training (originals when only training uses a resized cache)
        self.val_layout = layout if val_layout is None else val_layout
        self.labeled, self.val = list(labeled), list(val)
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size)
        self.num_workers = int(num_workers)
        self.train_subset, self.val_subset = train_subset, val_subset
        self.persistent_workers = persistent_workers and self.num_workers > 0
        self.prefetch_factor = prefetch_factor
        self.model_labeled: dict[str, list[str]] | None = None
        self.model_train_transforms = dict(model_train_transforms or {})
        self.phase_loader: Callable[[int, int], Any] | None = None
        self._batch_logged: set[str] = set()
        if model_labeled:
            self.set_model_labeled(model_labeled)

    def set_model_labeled(self, model_labeled: Mapping[str, Sequence[str]] | None) -> None:
        """Train each model on its own labeled list (``{key: names}``), or all on the split's (None)."""
        if model_labeled is not None and not all(model_labeled.values()):
            raise ValueError(f"every model needs at least one labeled image: {sorted(model_labeled)}")
        self.model_labeled = {k: list(v) for k, v in model_labeled.items()} if model_labeled else None

    def serve_phase(self, make_loader: Callable[[int, int], Any] | None) -> None:
        """Train on a DMT phase's batches: ``make_loader(world_size, rank)`` builds this process's loader when
        a Trainer asks (None: back to the labeled split)."""
        self.phase_loader = make_loader

    def train_dataset(self, names: Sequence[str] | None = None, key: str | None = None) -> SegmentationDataset:
        """Labeled training images (``names``, default the split's labeled list) with the training transform
        (model ``key``'s own when it has one, else the shared one)."""
        names = self.labeled if names is None else list(names)
        transform = self.model_train_transforms.get(key, self.train_transform) if key else self.train_transform
        return SegmentationDataset(self.layout, self.train_subset, names, transform)

    def val_dataset(self) -> SegmentationDataset:
        """Validation images with the evaluation transform."""
        return SegmentationDataset(self.val_layout, self.val_subset, self.val, self.eval_transform)

    def world(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` of the Trainer this datamodule serves; ``(1, 0)`` without one."""
        if self.trainer is None:
            return 1, 0
        return int(self.trainer.world_size), int(self.trainer.global_rank)

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        world, rank = self.world()
        if train:  # batch_size is global: this process's share, from its shard (dmtc.data.sharding)
            batch_size = device_batch(batch_size, world, "dataset.batch_size")
            sampler = train_sampler(dataset, world, rank)
        else:  # per device (it changes no figure); every val image counted once over all processes
            sampler = eval_sampler(dataset, world, rank)
        items = len(sampler) if sampler is not None else len(dataset)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train and items > batch_size,
            **loader_options(self.num_workers, prefetch_factor=self.prefetch_factor,
                             persistent=self.persistent_workers),
        )

    def log_batch(self, key: str, global_batch: int) -> None:
        """State the global and per-device batch once per process and key (DDP runs)."""
        world, rank = self.world()
        if world > 1 and rank == 0 and key not in self._batch_logged:
            self._batch_logged.add(key)
            log.info("%s=%d is the global batch: %d per device on %d processes", key, global_batch,
                     device_batch(global_batch, world, key), world)

    def train_dataloader(self) -> DataLoader | CombinedLoader:  # noqa: D102
        if self.phase_loader is not None:
            return self.phase_loader(*self.world())
        self.log_batch("dataset.batch_size", self.batch_size)
        if not self.model_labeled:
            return self._loader(self.train_dataset(), self.batch_size, train=True)
        datasets = {key: self.train_dataset(names, key) for key, names in self.model_labeled.items()}
        length = max(len(d) for d in datasets.values())
        loaders = {
            key: self._loader(d if len(d) == length else RepeatedDataset(d, length), self.batch_size, train=True)
            for key, d in datasets.items()
        }
        return CombinedLoader(loaders, mode="min_size")

    def val_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader(self.val_dataset(), self.val_batch_size, train=False)
