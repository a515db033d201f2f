"""Test-time inference: class probabilities at label resolution, optionally padded, flipped, multi-scale.

Used by :mod:`dmtc.tasks.evaluate`. The protocols it serves (DMT §4.1; the Cityscapes benchmark):

* DMT's protocol (``eval.protocol=dmt``): Cityscapes images resized to 512×1024 (labels nearest, by the
  evaluation transform); VOC full images zero-padded (after normalisation) at the bottom/right to 505×505,
  the padding cropped off the upsampled prediction (= labels padded with 255). Single scale, no flip.
* Full resolution (``eval.protocol=full``): the original images (Cityscapes 1024×2048), logits upsampled
  bilinearly to the label size.
* Logits (and averaged probabilities) are upsampled with the model's ``align_corners``
  (:func:`dmtc.models.upsample_logits`); input images are rescaled plainly (bilinear, align_corners=False).
* Sliding window (``eval.mode=slide``; UniMatch's and U2PL's protocol, not DMT's): windows of the training
  crop every ⅔ of a window, overlapping softmaxes averaged (:func:`slide_probs`).
* Optional test-time augmentation: ``flip`` averages the softmax of the image and of its mirror (mirrored
  back); ``scales`` runs the image resized by each factor (bilinear) and averages the softmax after
  upsampling each to the target size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmtc.models.deeplab import model_align_corners, upsample_logits


def pad_bottom_right(
    images: torch.Tensor, size: Sequence[int] | None, value: float | Sequence[float] = 0.0
) -> torch.Tensor:
    """Pad N×C×H×W ``images`` at the bottom/right to at least ``size`` (H, W) with ``value`` (one number, or
    one per channel: :func:`dmtc.data.transforms.pad_values`); larger images are left as they are in that
    dimension (no cropping)."""
    if size is None:
        return images
    height, width = images.shape[-2:]
    pad_h, pad_w = max(0, int(size[0]) - height), max(0, int(size[1]) - width)
    if pad_h == 0 and pad_w == 0:
        return images
    if isinstance(value, (int, float)):
        return F.pad(images, (0, pad_w, 0, pad_h), value=float(value))
    fill = torch.as_tensor(list(value), dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    out = fill.expand(images.shape[0], images.shape[1], height + pad_h, width + pad_w).clone()
    out[..., :height, :width] = images
    return out


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    return out["logits"] if isinstance(out, dict) else out


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Top/left corners of windows covering ``length``: every ``stride`` pixels, the last one flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


@torch.no_grad()
def slide_probs(
    model: nn.Module, images: torch.Tensor, window: Sequence[int], stride: Sequence[int],
    pad_value: float | Sequence[float] = 0.0,
) -> torch.Tensor:
    """Sliding-window softmax N×C×H×W of normalised N×3×H×W ``images`` (UniMatch's and U2PL's evaluation,
    not DMT's): windows of ``window`` (H, W) every ``stride`` pixels, the last one flush with the border;
    each window's logits are upsampled to the window (the model's ``align_corners``) and softmaxed, and
    overlapping probabilities are averaged. Images smaller than a window are padded at the bottom/right with
    ``pad_value`` and the padding cropped off."""
    wh, ww = (int(v) for v in window)
    sh, sw = (max(1, int(v)) for v in stride)
    height, width = images.shape[-2:]
    padded = pad_bottom_right(images, (wh, ww), pad_value)
    ph, pw = padded.shape[-2:]
    corners = model_align_corners(model)
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, ph, pw, device=images.device)
    for top in _window_starts(ph, wh, sh):
        for left in _window_starts(pw, ww, sw):
            crop = padded[..., top : top + wh, left : left + ww]
            probs = upsample_logits(_logits(model, crop).float(), (wh, ww), align_corners=corners).softmax(1)
            if total is None:
                total = probs.new_zeros(probs.shape[0], probs.shape[1], ph, pw)
            total[..., top : top + wh, left : left + ww] += probs
            count[..., top : top + wh, left : left + ww] += 1
    return (total / count)[..., :height, :width]


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: torch.Tensor,
    out_size: Sequence[int] | None = None,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    pad_to: Sequence[int] | None = None,
    window: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    pad_value: float | Sequence[float] = 0.0,
) -> torch.Tensor:
    """Softmax probabilities N×C×``out_size`` (float32) of ``model`` on normalised N×3×H×W ``images``.

    ``pad_to``: pad the input at the bottom/right to this size first (DMT's VOC 505×505) with ``pad_value``
    (per channel: the reference pads raw black, :func:`dmtc.data.transforms.pad_values`); the logits are
    upsampled to the padded size and the padding cropped off. ``scales``: resize factors of the
    (padded) input; ``flip``: add the horizontally mirrored input. ``window``: run every pass as a sliding
    window (:func:`slide_probs`, ``stride`` default ⅔ of the window) instead of on the whole image. The
    probabilities of all passes are averaged after bilinear upsampling to the (padded) input size; the
    result is then resized to ``out_size`` (default: the input size) if that differs.
    """
    if not scales:
        raise ValueError("scales must hold at least one factor")
    corners = model_align_corners(model)
    height, width = images.shape[-2:]
    padded = pad_bottom_right(images, pad_to, pad_value)
    target = tuple(padded.shape[-2:])
    if window is not None and stride is None:
        stride = [max(1, int(v) * 2 // 3) for v in window]
    total = None
    passes = 0
    for scale in scales:
        x = padded
        if float(scale) != 1.0:
            size = (max(1, round(target[0] * float(scale))), max(1, round(target[1] * float(scale))))
            x = F.interpolate(padded, size=size, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            inp = x.flip(-1) if mirrored else x
            if window is None:
                probs = upsample_logits(_logits(model, inp).float(), target, align_corners=corners).softmax(1)
            else:
                probs = upsample_logits(slide_probs(model, inp, window, stride, pad_value), target,
                                        align_corners=corners)
            if mirrored:
                probs = probs.flip(-1)
            total = probs if total is None else total + probs
            passes += 1
    probs = total[..., :height, :width] / passes
    if out_size is not None and tuple(int(s) for s in out_size) != (height, width):
        probs = upsample_logits(probs, out_size, align_corners=corners)
    return probs
