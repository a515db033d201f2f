"""Pseudo labels in one pass (DMT, Feng et al., Pattern Recognition 2022, §3: class-balanced curriculum).

At the start of DMT phase k each model predicts every unlabeled image once; per pixel we keep the argmax
class and its softmax confidence. DMT keeps, per class c, only the top ``r_k`` fraction of the pixels
predicted as c (threshold t_c); the rest become 255. Instead of re-running the model for every ratio, we
store (label, confidence) per image and a per-class confidence histogram; thresholds for any ratio come
from the histogram, and the dataset applies ``label[score < t[label]] = 255`` at load time
(:func:`apply_thresholds`).

Confidence is stored and ranked as the *score* ``s = -log(1 - p)`` of the max-softmax probability p,
computed from the logits as ``s = logsumexp(z) - logsumexp(z without its max)`` (exact, no float32
saturation). Ranking by s is ranking by p, but s keeps confident pixels apart: trained (and untrained)
models put many pixels within 1e-5 of p = 1, where a linear 16-bit code of p (or float16) collapses them
into one bin and the class-balanced curriculum can no longer keep "the top r" (measured: a class kept 82% of
its pixels at r = 0.4). The 16-bit code is logarithmic in s, ``code = round(K · log(1 + s / 0.1))`` with
``K = 65535 / log(1 + 1000 / 0.1)``: one step is 1.4e-5 in s near s = 0 (at most 3e-5 in p anywhere) and
0.014% of s + 0.1 above, up to s = 1000 (logit margins of 1000); decoding goes through one 65,536-entry
float32 table shared by every reader, so thresholds and stored scores compare exactly.

Store layout (:class:`PseudoLabelStore`)::

    <directory>/label/<name>.png        uint8 argmax class
    <directory>/confidence/<name>.png   uint16 score code (:func:`quantize_score`)
    <directory>/histogram.npz           int64 C×bins counts of scores, compressed (optional; older stores:
                                        histogram.npy, still read)
    <directory>/manifest.json           written last; only a store with a matching manifest is trusted

Every file is written to a temporary file in its own directory and moved into place with ``os.replace``.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dmtc.errors import DMTCError
from dmtc.models.deeplab import model_align_corners, upsample_logits

__all__ = [
    "CODE_MAX",
    "SCORE_FORMAT",
    "SCORE_MAX",
    "ConfidenceHistogram",
    "PseudoLabelStore",
    "apply_thresholds",
    "confidence_score",
    "confidence_to_score",
    "decode_score",
    "predict_to_store",
    "quantize_score",
    "score_to_confidence",
]

CODE_MAX = 65535
"""Largest 16-bit code of a stored score."""
SCORE_MAX = 1000.0
"""Scores ``s = -log(1 - p)`` are clamped to [0, SCORE_MAX] before quantisation."""
_SCORE_S0 = 0.1
_SCORE_K = CODE_MAX / math.log1p(SCORE_MAX / _SCORE_S0)
SCORE_FORMAT = "neglog1m-p/log1p-0.1-1000/u16"
"""Recorded in store manifests: stores written with another confidence code are redone, never misread."""


def _to_numpy(array: Sequence[float] | np.ndarray | Tensor) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, Tensor) else np.asarray(array)


def confidence_score(logits: Tensor, dim: int = 1) -> tuple[Tensor, Tensor]:
    """``(label, score)``: argmax class and ``s = -log(1 - max softmax)`` along ``dim``, float32.

    ``1 - p = Σ_{k≠max} e^{z_k} / Σ_k e^{z_k}``, so ``s = logsumexp(z) - logsumexp(z_{k≠max})``; unlike
    ``-log1p(-softmax.max())`` this stays exact where the softmax rounds to 1. One class only: s = inf.
    """
    z = logits.float()
    top, label = z.max(dim=dim, keepdim=True)
    others = z.scatter(dim, label, float("-inf"))
    score = torch.logsumexp(z, dim=dim) - torch.logsumexp(others, dim=dim)
    return label.squeeze(dim), score


def _code_to_score(code: np.ndarray) -> np.ndarray:
    """Inverse of the code, float64 in, float32 out: ``s = 0.1 · (exp(code / K) - 1)``."""
    return (_SCORE_S0 * np.expm1(np.asarray(code, dtype=np.float64) / _SCORE_K)).astype(np.float32)


_DECODE = _code_to_score(np.arange(CODE_MAX + 1))  # the one table every reader decodes with
_DECODE_TORCH = torch.from_numpy(_DECODE)


def _encode(score: np.ndarray) -> np.ndarray:
    s = np.clip(np.asarray(score, dtype=np.float64), 0.0, SCORE_MAX)
    return np.rint(_SCORE_K * np.log1p(s / _SCORE_S0)).astype(np.uint16)


def quantize_score(score: Tensor) -> tuple[Tensor, Tensor]:
    """``(code, score_q)``: the int32 code ``round(K · log(1 + clamp(s, 0, SCORE_MAX) / 0.1))`` and the
    float32 score the store returns for it (:func:`decode_score`). Feed the histogram ``score_q`` so its
    thresholds agree exactly with the scores :meth:`PseudoLabelStore.load` returns."""
    s = score.double().clamp(0.0, SCORE_MAX)
    code = torch.round(_SCORE_K * torch.log1p(s / _SCORE_S0)).to(torch.int32)
    return code, decode_score(code)


def decode_score(code: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """Score of 16-bit codes as float32 (numpy or torch, like the input), from the shared table."""
    if isinstance(code, Tensor):
        return _DECODE_TORCH.to(code.device)[code.long()]
    return _DECODE[np.asarray(code).astype(np.int64)]


def score_to_confidence(score: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """Max-softmax probability ``p = 1 - exp(-s)`` (float32; rounds to 1.0 above s ≈ 17)."""
    if isinstance(score, Tensor):
        return -torch.expm1(-score.float())
    return (-np.expm1(-np.asarray(score, dtype=np.float32))).astype(np.float32)


def confidence_to_score(confidence: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """``s = -log(1 - p)`` for probabilities p in [0, 1] (p = 1 gives SCORE_MAX); prefer
    :func:`confidence_score` on logits, which does not saturate."""
    if isinstance(confidence, Tensor):
        return (-torch.log1p(-confidence.double().clamp(0.0, 1.0))).clamp(max=SCORE_MAX).float()
    p = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        return np.minimum(-np.log1p(-p), SCORE_MAX).astype(np.float32)


class ConfidenceHistogram:
    """Per-class histograms of the confidence score of the pixels predicted as each class (DMT §3 curriculum).

    Scores are ``s = -log(1 - p)`` (module docstring); ranking by s is ranking by confidence p.
    ``counts[c, b]`` = pixels with argmax c and score in bin b = ``[edges[b], edges[b+1])`` where edges are
    the decoded scores of codes evenly spaced over 0..65535 (float32; with the default ``bins = 65536``,
    exactly the store's decoding table); the last bin holds s >= SCORE_MAX. Binning compares against the
    same float32 edges :meth:`thresholds` returns, so "s >= t_c" selects exactly whole bins.

    The default bins give every stored 16-bit code its own bin: thresholds are then the exact order
    statistics of the stored scores. Coarser bins bound the threshold error by one bin. Memory: C × bins
    int64 (10 MB for 19 classes).
    """

    def __init__(self, num_classes: int, bins: int = CODE_MAX + 1) -> None:
        if num_classes < 1 or bins < 2:
            raise ValueError(f"need num_classes >= 1 and bins >= 2, got {num_classes}, {bins}")
        self.num_classes = num_classes
        self.bins = bins
        self.counts = torch.zeros(num_classes, bins, dtype=torch.int64)
        codes = np.arange(bins, dtype=np.float64) * (CODE_MAX / (bins - 1))
        self.edges = torch.from_numpy(_DECODE.copy() if bins == CODE_MAX + 1 else _code_to_score(codes))
        self._inner_edges: dict[torch.device, Tensor] = {}

    def update(self, labels: Tensor, score: Tensor) -> None:
        """Add pixels (any shape, e.g. N×H×W argmax labels and their scores); one bincount.

        Labels outside ``[0, num_classes)`` (e.g. -1 or 255 for padding) are skipped.
        """
        labels = labels.reshape(-1).long()
        conf = score.reshape(-1).float()
        keep = (labels >= 0) & (labels < self.num_classes)
        edges = self._inner_edges.get(conf.device)
        if edges is None:
            edges = self._inner_edges.setdefault(conf.device, self.edges[1:].to(conf.device))
        bin_idx = torch.bucketize(conf, edges, right=True)  # number of inner edges <= conf
        flat = (labels * self.bins + bin_idx)[keep]
        counts = torch.bincount(flat, minlength=self.num_classes * self.bins)
        self.counts += counts.view(self.num_classes, self.bins).to(self.counts.device)

    def merge(self, other: ConfidenceHistogram) -> None:
        """Add another histogram's counts (same classes and bins)."""
        if other.counts.shape != self.counts.shape:
            raise ValueError(f"cannot merge histograms of shapes {tuple(other.counts.shape)} and "
                             f"{tuple(self.counts.shape)}")
        self.counts += other.counts.to(self.counts.device)

    def all_reduce(self) -> None:
        """Sum the counts over torch.distributed ranks (no-op when not initialised). Call once."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        counts = self.counts.to(device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        self.counts = counts.cpu()

    def predicted(self) -> Tensor:
        """Pixels predicted as each class, (C,) int64."""
        return self.counts.sum(dim=1)

    def thresholds(self, ratio: float) -> Tensor:
        """Class-balanced score thresholds (C,) float32 keeping the top ``ratio`` of each class's pixels.

        Let n_c be the pixels predicted as c and k_c = ceil(ratio·n_c) (at least 1). t_c is the lower edge
        of the highest bin b with ``Σ_{j>=b} counts[c, j] >= k_c``, so, for scores binned here:

        * kept_c = #(s >= t_c) satisfies ``k_c <= kept_c < k_c + counts[c, b]``: never fewer than the
          requested fraction, more by less than the mass of one bin;
        * the exact order statistic (k_c-th largest score) lies in ``[t_c, next edge)``; with the
          default bins and stored (quantised) scores it equals t_c, and kept_c exceeds k_c only by pixels
          tied with it. In confidence units the threshold is ``score_to_confidence(t_c)``.

        ``ratio >= 1`` gives t_c = 0 (keep all). A class nobody predicted gets ``inf`` (keeps nothing;
        no pixel carries that label anyway). ``ratio`` must be in (0, 1].
        """
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        n = self.predicted()
        if ratio >= 1.0:
            t = torch.zeros(self.num_classes, dtype=torch.float32)
        else:
            # The 1e-9 absorbs float error such as 0.7 * 10 = 7.000000000000001 (at worst k_c is one pixel
            # off the exact ceil, on the side of keeping more).
            k = torch.ceil(ratio * n.double() - 1e-9).long().clamp_min(1)
            suffix = self.counts.flip(1).cumsum(1).flip(1)
            b = (suffix >= k[:, None]).sum(1) - 1  # suffix is non-increasing in b
            t = self.edges[b.clamp_min(0)]
        return torch.where(n > 0, t, torch.full_like(t, math.inf))

    def kept(self, thresholds: Tensor) -> Tensor:
        """Pixels per class with score >= t_c, (C,) int64.

        Exact for thresholds returned by :meth:`thresholds` (bin edges, 0 or inf); for other values it
        counts the bins whose lower edge is >= t_c (a lower bound).
        """
        t = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1, 1)
        return (self.counts * (self.edges[None, :] >= t)).sum(dim=1)

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors: ``{"counts": C×bins int64}``."""
        return {"counts": self.counts.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        counts = torch.as_tensor(np.asarray(state["counts"])).long()
        if counts.shape != self.counts.shape:
            raise ValueError(f"histogram counts of shape {tuple(counts.shape)}, expected "
                             f"{tuple(self.counts.shape)}")
        self.counts = counts.clone()

    @classmethod
    def from_counts(cls, counts: Tensor | np.ndarray) -> ConfidenceHistogram:
        """A histogram from a C×bins count array (e.g. loaded from a store)."""
        counts = torch.as_tensor(np.asarray(counts)).long()
        hist = cls(counts.shape[0], counts.shape[1])
        hist.counts = counts.clone()
        return hist


def apply_thresholds(
    label: np.ndarray | Tensor,
    score: np.ndarray | Tensor,
    thresholds: Sequence[float] | np.ndarray | Tensor,
    ignore_index: int = 255,
) -> np.ndarray | Tensor:
    """DMT curriculum at load time: a copy of ``label`` with ``label[s < t[label]] = ignore_index``.

    ``score`` and ``thresholds`` are in the same unit (the store's scores and :meth:`ConfidenceHistogram.
    thresholds`; any monotone unit works). Works on numpy arrays or torch tensors (returns the same kind);
    labels already equal to ``ignore_index`` stay so. Compared as float32, like the histogram's edges.
    """
    t = _to_numpy(thresholds).astype(np.float32).reshape(-1)
    if isinstance(label, Tensor):
        t_torch = torch.from_numpy(t).to(label.device)
        s = torch.as_tensor(score, device=label.device).float()
        valid = label != ignore_index
        drop = valid & (s < t_torch[torch.where(valid, label, torch.zeros_like(label)).long()])
        return label.masked_fill(drop, ignore_index)
    label = np.asarray(label)
    valid = label != ignore_index
    drop = valid & (_to_numpy(score).astype(np.float32) < t[np.where(valid, label, 0)])
    out = label.copy()
    out[drop] = ignore_index
    return out


class PseudoLabelStore:
    """One model's pseudo labels for one phase: per image a uint8 label PNG and a uint16 score PNG.

    Protocol: :meth:`write` every image (the first write of a session deletes an existing manifest, so a
    store being rewritten is never trusted), then :meth:`finalize` writes ``manifest.json`` last. A
    reader calls :meth:`is_complete` with the metadata it expects and regenerates (``clear`` + write)
    when it returns False. Names may contain ``/`` (subfolders); ``..`` and absolute names are refused.
    """

    MANIFEST = "manifest.json"
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
    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        """Write to ``.<file>.<pid>.<random>.tmp`` beside ``path`` (mode from the umask), then rename."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _encode_png(self, array: np.ndarray, path: Path) -> bytes:
        ok, buf = cv2.imencode(".png", array)
        if not ok:
            raise DMTCError(f"OpenCV could not encode {path} (array {array.dtype} {array.shape})")
        return buf.tobytes()

    def write(self, name: str, label: np.ndarray | Tensor, confidence: np.ndarray | Tensor) -> None:
        """Store one image: ``label`` H×W class ids (0..255), ``confidence`` H×W: uint16 score codes
        (:func:`quantize_score`) or float probabilities in [0, 1] (converted with
        :func:`confidence_to_score`, which saturates near 1: prefer codes from :func:`confidence_score`)."""
        label_np = _to_numpy(label)
        conf_np = _to_numpy(confidence)
        if label_np.ndim != 2 or conf_np.shape != label_np.shape:
            raise ValueError(f"{name}: need H×W label and confidence, got {label_np.shape}, {conf_np.shape}")
        if label_np.dtype != np.uint8:
            if label_np.size and (label_np.min() < 0 or label_np.max() > 255):
                raise ValueError(f"{name}: labels must lie in 0..255")
            label_np = label_np.astype(np.uint8)
        if conf_np.dtype != np.uint16:
            conf_np = _encode(confidence_to_score(conf_np))
        if not self._manifest_dropped:
            self.manifest_path.unlink(missing_ok=True)
            self._manifest_dropped = True
        label_path, conf_path = self.label_path(name), self.confidence_path(name)
        self._atomic_write(label_path, self._encode_png(np.ascontiguousarray(label_np), label_path))
        self._atomic_write(conf_path, self._encode_png(np.ascontiguousarray(conf_np), conf_path))
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
            self._atomic_write(path, _npz_bytes(histogram.counts.numpy()))
            manifest["histogram"] = self.HISTOGRAM
        manifest["names"] = names
        self._atomic_write(self.manifest_path, json.dumps(manifest, indent=1).encode())

    # -- reading -----------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        """The parsed manifest, or None if absent or unreadable."""
        try:
            with open(self.manifest_path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def is_complete(self, expected: Mapping[str, Any]) -> bool:
        """True iff the manifest exists, holds every key of ``expected`` with an equal value (compared
        after a JSON round trip), lists names, and every listed file exists."""
        manifest = self.manifest()
        if manifest is None or not isinstance(manifest.get("names"), list):
            return False
        want = json.loads(json.dumps(dict(expected)))
        if any(k not in manifest or manifest[k] != v for k, v in want.items()):
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


@torch.no_grad()
def predict_to_store(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    store: PseudoLabelStore,
    histogram: ConfidenceHistogram,
    device: torch.device | str,
    *,
    amp: bool = False,
) -> list[str]:
    """One forward pass per image (DMT §3): store argmax label and confidence score, fill the histogram.

    ``loader`` yields ``{"image": N×3×H×W normalised float, "name": list[str], "size": N×2 (H, W)}``
    (``size`` optional: images padded at the bottom/right are cropped back to it). ``model(image)``
    must return ``{"logits": N×C×h×w}`` (any stride); logits are upsampled bilinearly to H×W with the
    model's ``align_corners`` (:func:`dmtc.models.upsample_logits`), then label = argmax and
    score = ``-log(1 - max softmax)`` (:func:`confidence_score`). The score is quantised to the stored
    16-bit code before it enters the histogram, so thresholds agree exactly with what
    :meth:`PseudoLabelStore.load` returns. Only the images the loader yields are written (each DDP rank
    its own shard); the caller all-reduces the histogram and finalizes the store. The model's
    train/eval mode is restored. Returns the names written.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    written: list[str] = []
    try:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, enabled=amp):
                logits = model(images)["logits"]
            height, width = images.shape[-2:]
            if logits.shape[1] > 255:
                raise ValueError(f"{logits.shape[1]} classes do not fit the uint8 label PNGs (max 255)")
            logits = upsample_logits(logits.float(), (height, width), align_corners=model_align_corners(model))
            label, score = confidence_score(logits, dim=1)
            code, score = quantize_score(score)
            sizes = batch.get("size")
            if sizes is None:
                sizes = torch.tensor([[height, width]] * images.shape[0])
            sizes = torch.as_tensor(sizes).long().reshape(-1, 2).tolist()
            rows = torch.arange(height, device=device).view(1, -1, 1)
            cols = torch.arange(width, device=device).view(1, 1, -1)
            size_t = torch.tensor(sizes, device=device)
            inside = (rows < size_t[:, 0].view(-1, 1, 1)) & (cols < size_t[:, 1].view(-1, 1, 1))
            histogram.update(label.masked_fill(~inside, -1), score)
            label_np = label.to(torch.uint8).cpu().numpy()
            code_np = code.cpu().numpy().astype(np.uint16)
            for i, name in enumerate(batch["name"]):
                h, w = sizes[i]
                store.write(name, label_np[i, :h, :w], code_np[i, :h, :w])
                written.append(name)
    finally:
        model.train(was_training)
    return written
