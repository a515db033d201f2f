"""The LightningDataModule of a run: the labeled split, the validation set and, in a DMT phase, the
labeled + pseudo-labeled batches of the phase."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from dmtc.data.datasets import RepeatedDataset, SegmentationDataset
from dmtc.data.layouts import DatasetLayout


class SegmentationDataModule(L.LightningDataModule):
    """Labeled training images (one DMT split) and the validation images of one layout.

    ``batch_size`` is the per-device batch of labeled images; training drops the last incomplete batch
    (BatchNorm cannot train on a batch of one). Validation uses ``val_batch_size`` (1 when image sizes
    differ). Under DDP Lightning gives each loader a DistributedSampler.

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
        self.model_labeled: dict[str, list[str]] | None = None
        self.model_train_transforms = dict(model_train_transforms or {})
        self.phase_loader: Callable[[int], Any] | None = None
        if model_labeled:
            self.set_model_labeled(model_labeled)

    def set_model_labeled(self, model_labeled: Mapping[str, Sequence[str]] | None) -> None:
        """Train each model on its own labeled list (``{key: names}``), or all on the split's (None)."""
        if model_labeled is not None and not all(model_labeled.values()):
            raise ValueError(f"every model needs at least one labeled image: {sorted(model_labeled)}")
        self.model_labeled = {k: list(v) for k, v in model_labeled.items()} if model_labeled else None

    def serve_phase(self, make_loader: Callable[[int], Any] | None) -> None:
        """Train on a DMT phase's batches: ``make_loader(world_size)`` builds its loader when a Trainer asks
        (None: back to the labeled split)."""
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

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader | CombinedLoader:  # noqa: D102
        if self.phase_loader is not None:
            return self.phase_loader(self.trainer.world_size if self.trainer is not None else 1)
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
