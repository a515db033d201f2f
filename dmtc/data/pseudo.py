"""Data of a DMT phase: unlabeled images carrying both models' pseudo labels, joined with labeled batches.

DMT (Feng et al., Pattern Recognition 2022, §3) trains A on B's pseudo labels and B on A's in phase k.
Each model labeled the unlabeled split once (:mod:`dmtc.pseudo_labels` stores); the class-balanced
curriculum for the phase's ratio r_k is a per-class confidence threshold applied here, at load time
(``label[score < t[label]] = 255``, on the stored scores ``-log(1 - p)``, :mod:`dmtc.pseudo_labels`).
The four maps (``label_a, conf_a, label_b, conf_b``) travel through
the same joint v2 transform as the image, wrapped as ``tv_tensors.Mask`` (nearest resizing, crops padded
with 255), so every geometric augmentation moves them together.

Batches: a phase batch is ``{"labeled": ..., "unlabeled": ...}`` from Lightning's ``CombinedLoader`` (one
stream shared by both models), or ``{"a": {"labeled", "unlabeled"}, "b": {...}}`` (each model its own).
An epoch is one pass over the unlabeled set; the labeled list is repeated (and reshuffled as a whole) to
the same number of batches instead of cycling a shorter loader, whose shuffle order would repeat within
the epoch (DESIGN §4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from dmtc.data.datasets import SegmentationDataset, read_image
from dmtc.data.layouts import DatasetLayout
from dmtc.pseudo_labels import PseudoLabelStore, apply_thresholds, decode_score, score_to_confidence

__all__ = ["PseudoLabeledDataset", "RepeatedDataset", "build_pair_phase_loader", "build_phase_loader"]


class PseudoLabeledDataset(Dataset):
    """Unlabeled images with both models' thresholded pseudo labels and stored confidences.

    Items: ``{"image": float C×H×W, "label_a"/"label_b": int64 H×W (255 = ignored), "conf_a"/"conf_b":
    float32 H×W in [0, 1], "name": str}``. Thresholds (one per class, from the store's histogram for the
    phase's ratio) are computed once per phase by the caller. Stored maps of another size than the image
    (labels made at a base resolution) are resized to the image nearest-neighbour first.
    """

    def __init__(
        self,
        layout: DatasetLayout,
        subset: str,
        names: Sequence[str],
        stores: dict[str, PseudoLabelStore],
        thresholds: dict[str, Sequence[float] | np.ndarray | torch.Tensor],
        transform: Callable[..., Any],
        ignore_index: int = 255,
    ) -> None:
        if set(stores) != set(thresholds):
            raise ValueError(f"stores {sorted(stores)} and thresholds {sorted(thresholds)} must name the same models")
        self.layout, self.subset, self.names = layout, subset, list(names)
        self.stores, self.transform, self.ignore_index = dict(stores), transform, int(ignore_index)
        self.thresholds = {k: np.asarray(torch.as_tensor(t).float().cpu(), dtype=np.float32)
                           for k, t in thresholds.items()}
        self.keys = sorted(self.stores)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.names[index]
        image = read_image(self.layout.image_path(self.subset, name))
        height, width = image.shape[:2]
        maps: list[tv_tensors.Mask] = []
        for key in self.keys:
            label, code = self.stores[key].load_codes(name)
            label = apply_thresholds(label, decode_score(code), self.thresholds[key], self.ignore_index)
            for array in (label.astype(np.int64), code.astype(np.int64)):
                mask = tv_tensors.Mask(torch.from_numpy(array))
                if array.shape != (height, width):
                    mask = TF.resize(mask, [height, width])  # masks: nearest
                maps.append(mask)
        image_t = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        image_t, *maps = self.transform(image_t, *maps)
        item: dict[str, Any] = {"image": image_t.as_subclass(torch.Tensor), "name": name}
        for i, key in enumerate(self.keys):
            label_t = maps[2 * i].as_subclass(torch.Tensor).long()
            code_t = maps[2 * i + 1].as_subclass(torch.Tensor)
            # crop padding fills masks with 255: those pixels are ignored through the label anyway
            item[f"label_{key}"] = label_t
            item[f"conf_{key}"] = score_to_confidence(decode_score(code_t))
        return item


class RepeatedDataset(Dataset):
    """``dataset`` repeated (index modulo its length) to ``length`` items; a shuffling sampler then mixes
    whole repetitions, so every item appears ⌊length/n⌋ or ⌈length/n⌉ times per epoch."""

    def __init__(self, dataset: Dataset, length: int) -> None:
        if len(dataset) == 0:
            raise ValueError("cannot repeat an empty dataset")
        self.dataset, self.length = dataset, int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index % len(self.dataset)]


def phase_loaders(
    labeled: Dataset,
    unlabeled: Dataset,
    *,
    labeled_batch_size: int,
    unlabeled_batch_size: int,
    num_workers: int = 0,
    world_size: int = 1,
) -> dict[str, DataLoader]:
    """``{"labeled", "unlabeled"}`` DataLoaders of one DMT phase stream, of equal length: one epoch = one pass
    over the unlabeled set (per device: ``len(unlabeled) // (world_size · unlabeled_batch_size)`` batches),
    labeled images repeated to fill as many labeled batches. The lengths are chosen before Lightning's
    DistributedSampler shards them, so every shard has the same number of batches."""
    if len(unlabeled) < unlabeled_batch_size * world_size:
        raise ValueError(f"{len(unlabeled)} unlabeled images cannot fill one batch of {unlabeled_batch_size} "
                         f"on {world_size} device(s)")
    batches = len(unlabeled) // (unlabeled_batch_size * world_size)
    labeled_rep = RepeatedDataset(labeled, max(batches * labeled_batch_size * world_size, 1))
    persistent = num_workers > 0
    common = {"num_workers": num_workers, "persistent_workers": persistent, "pin_memory": torch.cuda.is_available(),
              "drop_last": True, "shuffle": True}
    return {
        "labeled": DataLoader(labeled_rep, batch_size=labeled_batch_size, **common),
        "unlabeled": DataLoader(unlabeled, batch_size=unlabeled_batch_size, **common),
    }


def build_phase_loader(
    labeled: SegmentationDataset,
    unlabeled: PseudoLabeledDataset,
    *,
    labeled_batch_size: int,
    unlabeled_batch_size: int,
    num_workers: int = 0,
    world_size: int = 1,
) -> CombinedLoader:
    """One stream shared by both models (``method.streams=shared``): ``CombinedLoader({"labeled",
    "unlabeled"}, mode="min_size")`` of :func:`phase_loaders`; the unlabeled items carry both models'
    pseudo labels."""
    loaders = phase_loaders(labeled, unlabeled, labeled_batch_size=labeled_batch_size,
                            unlabeled_batch_size=unlabeled_batch_size, num_workers=num_workers, world_size=world_size)
    return CombinedLoader(loaders, mode="min_size")


def build_pair_phase_loader(
    streams: Mapping[str, tuple[Dataset, Dataset]],
    *,
    labeled_batch_size: int,
    unlabeled_batch_size: int,
    num_workers: int = 0,
    world_size: int = 1,
) -> CombinedLoader:
    """Each model its own stream (``method.streams=independent``, as the reference's two processes):
    ``streams = {key: (labeled, unlabeled)}`` becomes ``CombinedLoader({key: {"labeled", "unlabeled"}},
    mode="min_size")``: every model draws its own order, crops and flips of the same split; model k's
    unlabeled items carry only the *other* model's pseudo labels (its targets)."""
    loaders = {key: phase_loaders(lab, unl, labeled_batch_size=labeled_batch_size,
                                  unlabeled_batch_size=unlabeled_batch_size, num_workers=num_workers,
                                  world_size=world_size)
               for key, (lab, unl) in streams.items()}
    return CombinedLoader(loaders, mode="min_size")


def phase_batches(num_unlabeled: int, unlabeled_batch_size: int, world_size: int = 1) -> int:
    """Batches per device in one DMT phase epoch (one pass over the unlabeled set)."""
    return max(0, math.floor(num_unlabeled / (unlabeled_batch_size * world_size)))
