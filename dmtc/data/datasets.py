"""Segmentation datasets: opencv decoding into tv_tensors, then a joint v2 transform."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from dmtc.data.layouts import DatasetLayout
from dmtc.errors import DMTCError

# Decoding runs inside DataLoader workers: keep opencv single-threaded there.
cv2.setNumThreads(0)


class DecodedCache:
    """Decoded files kept in this process's memory, up to ``max_bytes``, least recently used out first.

    An entry is keyed by the file's path, inode, size and modification time, so a rewritten or replaced file
    (a new inode: every atomic write) is decoded again. Reads return a copy (callers may modify their
    array). Each DataLoader worker process holds its own.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used = int(max_bytes), 0
        self._arrays: OrderedDict[tuple[str, str, int, int, int], np.ndarray] = OrderedDict()

    def read(self, path: Path, kind: str, decode: Callable[[], np.ndarray]) -> np.ndarray:
        """``decode()``'s array for file ``path`` (``kind`` names the decoding), from memory when cached."""
        try:
            stat = os.stat(path)
        except OSError:
            return decode()  # missing: decode() raises the error that names the file
        key = (str(path), kind, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        array = self._arrays.get(key)
        if array is not None:
            self._arrays.move_to_end(key)
            return array.copy()
        array = decode()
        if array.nbytes <= self.max_bytes:
            while self.used + array.nbytes > self.max_bytes:
                self.used -= self._arrays.popitem(last=False)[1].nbytes
            self._arrays[key], self.used = array, self.used + array.nbytes
        return array.copy()


_decoded: DecodedCache | None = None


def keep_decoded_in_memory(max_mb: float | None) -> None:
    """Cache up to ``max_mb`` MB of decoded images, labels and pseudo-label maps in this process
    (``dataset.ram_cache_mb``; 0 or None: decode every read). Small datasets read many times (the synthetic
    set: ~65 MB read ~40 times per default run, and each phase's pseudo labels: ~67 MB read 3 times) skip PNG
    decoding after the first read; results are unchanged (the same arrays)."""
    global _decoded
    max_bytes = int(float(max_mb or 0) * 2**20)
    if max_bytes <= 0:
        _decoded = None
    elif _decoded is None or _decoded.max_bytes != max_bytes:
        _decoded = DecodedCache(max_bytes)


def read_decoded(path: Path, kind: str, decode: Callable[[], np.ndarray]) -> np.ndarray:
    """``decode()`` of file ``path``, through this process's :class:`DecodedCache` when
    :func:`keep_decoded_in_memory` turned it on (``kind``: the decoding, part of the cache key)."""
    return decode() if _decoded is None else _decoded.read(path, kind, decode)


def _decode_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DMTCError(f"cannot read image {path}: the file is missing or corrupt; restore or re-download it")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _decode_label(path: Path) -> np.ndarray:
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DMTCError(f"cannot read label {path}: the file is missing or corrupt; restore or re-download it")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise DMTCError(
            f"label {path} has shape {label.shape} and dtype {label.dtype}: dmtc expects single-channel 8-bit "
            "PNGs holding class ids (255 = ignore)"
        )
    return label


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to an H×W×3 uint8 RGB array; a missing or corrupt file is a DMTCError. Served
    from memory when :func:`keep_decoded_in_memory` is on and the file was read before."""
    return read_decoded(path, "rgb", lambda: _decode_image(path))


def read_label(path: Path, label_map: np.ndarray | None = None) -> np.ndarray:
    """Decode a single-channel label PNG to H×W uint8 class ids, mapped through ``label_map`` if given
    (cached like :func:`read_image`, before the mapping)."""
    label = read_decoded(path, "label", lambda: _decode_label(path))
    if label_map is not None:
        label = label_map[label]
    return label


class SegmentationDataset(Dataset):
    """Images (and labels) of ``names`` in ``subset`` of a layout.

    Each item is ``{"image": float C×H×W, "label": int64 H×W (255 = ignore), "name": str,
    "size": int64 (H, W) of the decoded image}``. Without labels (``with_labels=False``) the label is all
    255, so unlabeled images can share collation with labeled ones.
    """

    def __init__(
        self,
        layout: DatasetLayout,
        subset: str,
        names: Sequence[str],
        transform: Callable[..., Any],
        *,
        with_labels: bool = True,
    ) -> None:
        self.layout, self.subset, self.names = layout, subset, list(names)
        self.transform, self.with_labels = transform, with_labels

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.names[index]
        image = read_image(self.layout.image_path(self.subset, name))
        if self.with_labels:
            label = read_label(self.layout.label_path(self.subset, name), self.layout.label_map)
            if label.shape != image.shape[:2]:
                raise DMTCError(
                    f"label {self.layout.label_path(self.subset, name)} is {label.shape[1]}×{label.shape[0]} but "
                    f"its image is {image.shape[1]}×{image.shape[0]}: image and label must have the same size"
                )
        else:
            label = np.full(image.shape[:2], 255, dtype=np.uint8)
        size = torch.tensor(image.shape[:2], dtype=torch.int64)
        image_t = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        label_t = tv_tensors.Mask(torch.from_numpy(label))
        image_t, label_t = self.transform(image_t, label_t)
        return {
            "image": image_t.as_subclass(torch.Tensor),
            "label": label_t.as_subclass(torch.Tensor).long(),
            "name": name,
            "size": size,
        }


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
