"""Pseudo-labeled data of a DMT phase: unlabeled images carrying the models' pseudo labels, joined with
labeled batches.

DMT (Feng et al., Pattern Recognition 2022, §3) trains A on B's pseudo labels and B on A's in phase k.
Each model labeled the unlabeled split once (:mod:`dmtc.dmt.store`); the class-balanced
curriculum for the phase's ratio r_k is a per-class confidence threshold applied here, at load time
(``label[score < t[label]] = 255``, on the stored scores ``-log(1 - p)``, :mod:`dmtc.dmt.scores`).
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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from dmtc.data.datamodule import SegmentationDataModule
from dmtc.data.datasets import RepeatedDataset, SegmentationDataset, read_image
from dmtc.data.layouts import IGNORE_INDEX, DatasetLayout
from dmtc.data.loading import loader_options
from dmtc.data.sharding import device_batch, train_sampler
from dmtc.dmt.curriculum import apply_thresholds
from dmtc.dmt.scores import decode_score, score_to_confidence
from dmtc.dmt.store import PseudoLabelStore

__all__ = ["PseudoLabeledDataset", "build_pair_phase_loader", "build_phase_loader"]


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
        ignore_index: int = IGNORE_INDEX,
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


def phase_loaders(
    labeled: Dataset,
    unlabeled: Dataset,
    *,
    labeled_batch_size: int,
    unlabeled_batch_size: int,
    num_workers: int = 0,
    prefetch_factor: int | None = None,
    world_size: int = 1,
    rank: int = 0,
) -> dict[str, DataLoader]:
    """``{"labeled", "unlabeled"}`` DataLoaders of one DMT phase stream for process ``rank`` of
    ``world_size``, of equal length: one epoch = one pass over the unlabeled set,
    ``len(unlabeled) // unlabeled_batch_size`` steps whatever the device count (the batch sizes are global:
    each process loads its share from its own shard, :mod:`dmtc.data.sharding`), with the labeled images
    repeated to fill as many labeled batches. Loader options: :func:`dmtc.data.loading.loader_options`."""
    if len(unlabeled) < unlabeled_batch_size:
        raise ValueError(f"{len(unlabeled)} unlabeled images cannot fill one batch of {unlabeled_batch_size}")
    batches = len(unlabeled) // unlabeled_batch_size
    labeled_rep = RepeatedDataset(labeled, max(batches * labeled_batch_size, 1))
    sizes = {"labeled": device_batch(labeled_batch_size, world_size, "method.phase.labeled_batch_size"),
             "unlabeled": device_batch(unlabeled_batch_size, world_size, "method.phase.unlabeled_batch_size")}
    loaders = {}
    for name, dataset in (("labeled", labeled_rep), ("unlabeled", unlabeled)):
        sampler = train_sampler(dataset, world_size, rank)
        loaders[name] = DataLoader(dataset, batch_size=sizes[name], sampler=sampler, shuffle=sampler is None,
                                   drop_last=True, **loader_options(num_workers, prefetch_factor=prefetch_factor))
    return loaders


def build_phase_loader(labeled: SegmentationDataset, unlabeled: PseudoLabeledDataset, **sizes: int) -> CombinedLoader:
    """One stream shared by both models (``method.streams=shared``): ``CombinedLoader({"labeled",
    "unlabeled"}, mode="min_size")`` of :func:`phase_loaders` (``sizes``: its batch sizes, workers and world
    size); the unlabeled items carry both models' pseudo labels."""
    return CombinedLoader(phase_loaders(labeled, unlabeled, **sizes), mode="min_size")


def build_pair_phase_loader(streams: Mapping[str, tuple[Dataset, Dataset]], **sizes: int) -> CombinedLoader:
    """Each model its own stream (``method.streams=independent``, as the reference's two processes):
    ``streams = {key: (labeled, unlabeled)}`` becomes ``CombinedLoader({key: {"labeled", "unlabeled"}},
    mode="min_size")``: every model draws its own order, crops and flips of the same split; model k's
    unlabeled items carry only the *other* model's pseudo labels (its targets)."""
    return CombinedLoader({key: phase_loaders(lab, unl, **sizes) for key, (lab, unl) in streams.items()},
                          mode="min_size")


def phase_loader_factory(
    datamodule: SegmentationDataModule,
    layout: DatasetLayout,
    unlabeled_subset: str,
    unlabeled: Sequence[str],
    stores: Mapping[str, PseudoLabelStore],
    thresholds: Mapping[str, torch.Tensor],
    *,
    streams: str,
    order: Callable[[Sequence[str], str], list[str]],
    labeled_batch_size: int,
    unlabeled_batch_size: int,
    num_workers: int,
    prefetch_factor: int | None = None,
) -> Callable[[int, int], CombinedLoader]:
    """``make_loader(world_size, rank)`` of one DMT phase (for :meth:`SegmentationDataModule.serve_phase`).

    The labeled batches come from the run's whole labeled split in every ``pair_init`` mode (DMT's VOC
    1/106 script trains its phases with ``--train-set=106``, not the ``-l``/``-r`` lists).
    ``streams="shared"``: one stream with the warm-up's training transform (one normalised block per model
    when their inits differ) and both models' pseudo labels; ``"independent"``: model k reads the labeled
    split and the unlabeled images with the *other* model's labels (its targets), in its own order
    (``order(names, k)``, :func:`dmtc.dmt.pair.stream_order`) and augmentation, through its own input
    pipeline."""
    sizes = {"labeled_batch_size": labeled_batch_size, "unlabeled_batch_size": unlabeled_batch_size,
             "num_workers": num_workers, "prefetch_factor": prefetch_factor}
    if streams == "shared":
        pseudo = PseudoLabeledDataset(layout, unlabeled_subset, unlabeled, dict(stores), dict(thresholds),
                                      datamodule.train_transform)
        labeled = datamodule.train_dataset()

        def make_shared(world_size: int, rank: int) -> CombinedLoader:
            return build_phase_loader(labeled, pseudo, world_size=world_size, rank=rank, **sizes)

        return make_shared
    per_model = {}
    for key, other in (("a", "b"), ("b", "a")):
        transform = datamodule.model_train_transforms[key]
        labeled_k = datamodule.train_dataset(order(datamodule.labeled, key), key)
        unlabeled_k = PseudoLabeledDataset(layout, unlabeled_subset, order(unlabeled, key),
                                           {other: stores[other]}, {other: thresholds[other]}, transform)
        per_model[key] = (labeled_k, unlabeled_k)

    def make_pair(world_size: int, rank: int) -> CombinedLoader:
        return build_pair_phase_loader(per_model, world_size=world_size, rank=rank, **sizes)

    return make_pair
