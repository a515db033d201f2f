"""LightningDataModule for the labeled split and the validation set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from dmtc.data.datasets import SegmentationDataset
from dmtc.data.layouts import DatasetLayout


class SegmentationDataModule(L.LightningDataModule):
    """Labeled training images (one DMT split) and the validation images of one layout.

    ``batch_size`` is the per-device batch of labeled images; training drops the last incomplete batch
    (BatchNorm cannot train on a batch of one). Validation uses ``val_batch_size`` (1 when image sizes
    differ). Under DDP Lightning gives each loader a DistributedSampler.
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

    def train_dataset(self) -> SegmentationDataset:
        """Labeled training images with the training transform."""
        return SegmentationDataset(self.layout, self.train_subset, self.labeled, self.train_transform)

    def val_dataset(self) -> SegmentationDataset:
        """Validation images with the evaluation transform."""
        return SegmentationDataset(self.val_layout, self.val_subset, self.val, self.eval_transform)

    def _loader(self, dataset: SegmentationDataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader(self.train_dataset(), self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader(self.val_dataset(), self.val_batch_size, train=False)
