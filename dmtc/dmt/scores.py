"""The confidence code of DMT's pseudo-label stores: scores ``s = -log(1 - p)`` in 16 bits.

Confidence is stored and ranked as the *score* ``s = -log(1 - p)`` of the max-softmax probability p,
computed from the logits as ``s = logsumexp(z) - logsumexp(z without its max)`` (exact, no float32
saturation). Ranking by s is ranking by p, but s keeps confident pixels apart: trained (and untrained)
models put many pixels within 1e-5 of p = 1, where a linear 16-bit code of p (or float16) collapses them
into one bin and the class-balanced curriculum (DMT, Feng et al., Pattern Recognition 2022, §3) can no
longer keep "the top r" (measured: a class kept 82% of its pixels at r = 0.4). The 16-bit code is
logarithmic in s, ``code = round(K · log(1 + s / 0.1))`` with ``K = 65535 / log(1 + 1000 / 0.1)``: one step
is 1.4e-5 in s near s = 0 (at most 3e-5 in p anywhere) and 0.014% of s + 0.1 above, up to s = 1000 (logit
margins of 1000); decoding goes through one 65,536-entry float32 table shared by every reader, so
thresholds and stored scores compare exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

CODE_MAX = 65535
"""Largest 16-bit code of a stored score."""


SCORE_MAX = 1000.0
"""Scores ``s = -log(1 - p)`` are clamped to [0, SCORE_MAX] before quantisation."""


_SCORE_S0 = 0.1


_SCORE_K = CODE_MAX / math.log1p(SCORE_MAX / _SCORE_S0)


SCORE_FORMAT = "neglog1m-p/log1p-0.1-1000/u16"
"""Recorded in store manifests: stores written with another confidence code are redone, never misread."""


def to_numpy(array: Sequence[float] | np.ndarray | Tensor) -> np.ndarray:
    """A numpy view of a tensor (detached, on the CPU) or an array-like."""
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


def code_to_score(code: np.ndarray) -> np.ndarray:
    """Inverse of the code, float64 in, float32 out: ``s = 0.1 · (exp(code / K) - 1)``."""
    return (_SCORE_S0 * np.expm1(np.asarray(code, dtype=np.float64) / _SCORE_K)).astype(np.float32)


_DECODE = code_to_score(np.arange(CODE_MAX + 1))  # the one table every reader decodes with


_DECODE_TORCH = torch.from_numpy(_DECODE)


def encode_score(score: np.ndarray) -> np.ndarray:
    """uint16 codes of float scores (numpy): ``round(K · log(1 + clamp(s, 0, SCORE_MAX) / 0.1))``."""
    s = np.clip(np.asarray(score, dtype=np.float64), 0.0, SCORE_MAX)
    return np.rint(_SCORE_K * np.log1p(s / _SCORE_S0)).astype(np.uint16)


def quantize_score(score: Tensor) -> tuple[Tensor, Tensor]:
    """``(code, score_q)``: the int32 code ``round(K · log(1 + clamp(s, 0, SCORE_MAX) / 0.1))`` and the
    float32 score the store returns for it (:func:`decode_score`). Feed the histogram ``score_q`` so its
    thresholds agree exactly with the scores :meth:`PseudoLabelStore.load` returns."""
    s = score.double().clamp(0.0, SCORE_MAX)
    code = torch.round(_SCORE_K * torch.log1p(s / _SCORE_S0)).to(torch.int32)
    return code, decode_score(code)


_DECODE_ON_DEVICE: dict[torch.device, Tensor] = {}


def _decode_table(device: torch.device) -> Tensor:
    """The decoding table on ``device``, copied there once (a copy per call would be a host sync on CUDA)."""
    if device.type == "cpu":
        return _DECODE_TORCH
    table = _DECODE_ON_DEVICE.get(device)
    if table is None:
        table = _DECODE_ON_DEVICE.setdefault(device, _DECODE_TORCH.to(device))
    return table


def decode_score(code: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """Score of 16-bit codes as float32 (numpy or torch, like the input), from the shared table."""
    if isinstance(code, Tensor):
        return _decode_table(code.device)[code.long()]
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
