"""One model's pseudo labels for one DMT phase on disk (DMT, Feng et al., Pattern Recognition 2022, §3).

Store layout (:class:`PseudoLabelStore`)::

    <directory>/label/<name>.png        uint8 argmax class
    <directory>/confidence/<name>.png   uint16 score code (:func:`dmtc.dmt.scores.quantize_score`)
    <directory>/histogram.npz           int64 C×bins counts of scores, compressed (optional; older stores:
                                        histogram.npy, still read)
    <directory>/manifest.json           written last; only a store with a matching manifest is trusted

Every file is written atomically (:mod:`dmtc.files`).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch import Tensor

from dmtc.data.datasets import read_decoded
from dmtc.dmt.curriculum import ConfidenceHistogram
from dmtc.dmt.scores import confidence_to_score, decode_score, encode_score, to_numpy
from dmtc.errors import DMTCError
from dmtc.files import MANIFEST, atomic_write_bytes, read_json, read_manifest, write_manifest


class PseudoLabelStore:
    """One model's pseudo labels for one phase: per image a uint8 label PNG and a uint16 score PNG.

    Protocol: :meth:`write` every image (the first write of a session deletes an existing manifest, so a
    store being rewritten is never trusted), then :meth:`finalize` writes ``manifest.json`` last. A
    reader calls :meth:`is_complete` with the metadata it expects and regenerates (``clear`` + write)
    when it returns False. Names may contain ``/`` (subfolders); ``..`` and absolute names are refused.
    """

    MANIFEST = MANIFEST
    HISTOGRAM = "histogram.npz"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._written: list[str] = []
        self._manifest_dropped = False

    # -- paths -------------------------------------------------------------------------------------
    def label_path(self, name: str) -> Path:
        return self.directory / "label" / f"{self._check_name(name)}.png"

    def confidence_path(self, name: str) -> Path:
        return self.directory / "confidence" / f"{self._check_name(name)}.png"

    @property
    def manifest_path(self) -> Path:
        return self.directory / self.MANIFEST

    @staticmethod
    def _check_name(name: str) -> str:
        parts = name.split("/")
        if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid pseudo-label name {name!r}: use a relative path without '..'")
        return name

    # -- writing -----------------------------------------------------------------------------------
    def _encode_png(self, array: np.ndarray, path: Path) -> bytes:
        ok, buf = cv2.imencode(".png", array)
        if not ok:
            raise DMTCError(f"OpenCV could not encode {path} (array {array.dtype} {array.shape})")
        return buf.tobytes()

    def _arrays(self, name: str, label: np.ndarray | Tensor, confidence: np.ndarray | Tensor
                ) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 label and uint16 code arrays of one image, checked (see :meth:`write`)."""
        label_np = to_numpy(label)
        conf_np = to_numpy(confidence)
        if label_np.ndim != 2 or conf_np.shape != label_np.shape:
            raise ValueError(f"{name}: need H×W label and confidence, got {label_np.shape}, {conf_np.shape}")
        if label_np.dtype != np.uint8:
            if label_np.size and (label_np.min() < 0 or label_np.max() > 255):
                raise ValueError(f"{name}: labels must lie in 0..255")
            label_np = label_np.astype(np.uint8)
        if conf_np.dtype != np.uint16:
            conf_np = encode_score(confidence_to_score(conf_np))
        return label_np, conf_np

    def _write_arrays(self, name: str, label_np: np.ndarray, conf_np: np.ndarray) -> None:
        """Encode and write the two PNGs of one image, each atomically (safe from several threads at once)."""
        label_path, conf_path = self.label_path(name), self.confidence_path(name)
        atomic_write_bytes(label_path, self._encode_png(np.ascontiguousarray(label_np), label_path))
        atomic_write_bytes(conf_path, self._encode_png(np.ascontiguousarray(conf_np), conf_path))

    def reserve(self, name: str) -> None:
        """The bookkeeping of a write, in the caller's thread: check ``name``, drop an existing manifest at the
        first write of this object (a store being rewritten is never trusted) and record the name, in order.
        :class:`dmtc.dmt.store_writer.BackgroundStoreWriter` calls it, then writes the files from a thread
        (:meth:`write_reserved`)."""
        self._check_name(name)
        if not self._manifest_dropped:
            self.manifest_path.unlink(missing_ok=True)
            self._manifest_dropped = True
        self._written.append(name)

    def write_reserved(self, name: str, label: np.ndarray | Tensor, confidence: np.ndarray | Tensor) -> None:
        """The files of a write whose name :meth:`reserve` recorded (thread-safe: touches only this image's
        two files); the same checks and bytes as :meth:`write`."""
        self._write_arrays(name, *self._arrays(name, label, confidence))

    def write(self, name: str, label: np.ndarray | Tensor, confidence: np.ndarray | Tensor) -> None:
        """Store one image: ``label`` H×W class ids (0..255), ``confidence`` H×W: uint16 score codes
        (:func:`quantize_score`) or float probabilities in [0, 1] (converted with
        :func:`confidence_to_score`, which saturates near 1: prefer codes from :func:`confidence_score`)."""
        arrays = self._arrays(name, label, confidence)
        if not self._manifest_dropped:
            self.manifest_path.unlink(missing_ok=True)
            self._manifest_dropped = True
        self._write_arrays(name, *arrays)
        self._written.append(name)

    @property
    def written(self) -> list[str]:
        """Names written through this object (this process), in order."""
        return list(self._written)

    def finalize(
        self,
        meta: Mapping[str, Any],
        names: Iterable[str] | None = None,
        histogram: ConfidenceHistogram | None = None,
    ) -> None:
        """Write ``manifest.json`` atomically, last: ``meta`` + ``"names"`` (+ ``"histogram"``).

        ``names`` defaults to the names written through this object; under DDP pass the full list (all
        ranks' shards) from the rank that finalizes, after a barrier. ``histogram`` (all-reduced already)
        is saved as ``histogram.npz`` (compressed: C × 65,536 bins are mostly empty) before the manifest.
        Every listed file must exist.
        """
        names = sorted(set(self._written if names is None else names))
        paths = (p for n in names for p in (self.label_path(n), self.confidence_path(n)))
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DMTCError(f"pseudo-label store {self.directory} lacks {len(missing)} files, e.g. "
                            f"{missing[0]}; delete the store and regenerate it")
        manifest = dict(meta)
        reserved = {"names", "histogram"} & manifest.keys()
        if reserved:
            raise ValueError(f"meta keys {sorted(reserved)} are reserved for the store")
        if histogram is not None:
            path = self.directory / self.HISTOGRAM
            atomic_write_bytes(path, _npz_bytes(histogram.counts.numpy()))
            manifest["histogram"] = self.HISTOGRAM
        manifest["names"] = names
        write_manifest(self.directory, manifest)

    # -- reading -----------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        """The parsed manifest, or None if absent or unreadable."""
        data = read_json(self.manifest_path)
        return data if isinstance(data, dict) else None

    def is_complete(self, expected: Mapping[str, Any]) -> bool:
        """True iff the manifest exists, holds every key of ``expected`` with an equal value (compared
        after a JSON round trip), lists names, and every listed file exists."""
        manifest = read_manifest(self.directory, expected)
        if manifest is None or not isinstance(manifest.get("names"), list):
            return False
        try:
            paths = [p for n in manifest["names"] for p in (self.label_path(n), self.confidence_path(n))]
        except (ValueError, TypeError, AttributeError):
            return False
        if "histogram" in manifest:
            paths.append(self.directory / str(manifest["histogram"]))
        return all(p.is_file() for p in paths)

    def names(self) -> list[str]:
        """Names listed in the manifest (empty if there is none)."""
        manifest = self.manifest()
        return list(manifest.get("names", [])) if manifest else []

    def load_histogram(self) -> ConfidenceHistogram:
        """The histogram saved by :meth:`finalize` (the file its manifest names)."""
        manifest = self.manifest() or {}
        path = self.directory / str(manifest.get("histogram") or self.HISTOGRAM)
        try:
            loaded = np.load(path, allow_pickle=False)
            counts = loaded["counts"] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
        except (OSError, ValueError, EOFError, KeyError) as e:
            raise DMTCError(f"cannot read pseudo-label histogram {path} ({e}); delete the store "
                            f"{self.directory} (it will be regenerated)") from e
        return ConfidenceHistogram.from_counts(counts)

    def _read_png(self, path: Path, dtype: type[np.generic], shape: tuple[int, ...] | None) -> np.ndarray:
        # through the process's decoded-file cache where dataset.ram_cache_mb turned it on: the summaries'
        # read-back decodes a phase's maps once and both epochs of the phase read them from memory
        return read_decoded(path, f"pseudo-{np.dtype(dtype).name}",
                            lambda: self._decode_png(path, dtype, shape))

    def _decode_png(self, path: Path, dtype: type[np.generic], shape: tuple[int, ...] | None) -> np.ndarray:
        try:
            data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
            image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        except (OSError, cv2.error):
            image = None
        if image is None or image.dtype != dtype or image.ndim != 2 or (shape and image.shape != shape):
            raise DMTCError(f"pseudo-label file {path} is missing, corrupt or inconsistent; delete the "
                            f"store {self.directory} (it will be regenerated)")
        return image

    def load_codes(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(label uint8 H×W, score code uint16 H×W)``; unreadable files raise :class:`DMTCError`."""
        label = self._read_png(self.label_path(name), np.uint8, None)
        return label, self._read_png(self.confidence_path(name), np.uint16, label.shape)

    def load(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(label uint8 H×W, score float32 H×W)`` (scores as :func:`decode_score`; confidence =
        :func:`score_to_confidence`); unreadable files raise :class:`DMTCError`."""
        label, code = self.load_codes(name)
        return label, decode_score(code)

    def clear(self) -> None:
        """Delete the store's files (manifest first, so it is untrusted at every step); other files in the
        directory are left alone and the directory is removed only if it ends up empty."""
        self.manifest_path.unlink(missing_ok=True)
        self._manifest_dropped = True
        self._written.clear()
        if not self.directory.is_dir():
            return
        (self.directory / self.HISTOGRAM).unlink(missing_ok=True)
        for sub in ("label", "confidence"):
            shutil.rmtree(self.directory / sub, ignore_errors=True)
        for tmp in self.directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        try:
            self.directory.rmdir()
        except OSError:
            pass


def _npz_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, counts=array)
    return buf.getvalue()
