"""Joint image/label transforms on ``torchvision.transforms.v2``.

Images travel as ``tv_tensors.Image`` and labels as ``tv_tensors.Mask``, so every geometric transform is
applied to both with the right interpolation (labels always nearest, never interpolated). Training follows
DeepLab/DMT augmentation (DMT §4.1): optional base resize (Cityscapes 512×1024), random scale in
``scale_range``, normalisation, random crop padded with 0 for the (normalised) image and 255 (ignore) for
the label, horizontal flip. ``pad_fill="black"`` normalises last, so the image padding is raw black as in
the reference code; ``antialias=False`` resizes with plain bilinear as the reference's tensor resize.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dmtc.data.layouts import IGNORE_INDEX

PAD_FILLS = ("mean", "black")
"""Crop padding of the image: ``mean`` = 0 after normalisation (the mean colour), ``black`` = 0 before it
(the reference DMT code pads the raw image with zeros, then normalises)."""


class RandomScale(v2.Transform):
    """Resize image and mask by one random factor ``s ~ U(low, high)`` (image bilinear, antialiased when
    downscaling unless ``antialias=False``; mask nearest)."""

    def __init__(self, low: float, high: float, antialias: bool = True) -> None:
        super().__init__()
        if not 0 < low <= high:
            raise ValueError(f"scale range must satisfy 0 < low <= high, got ({low}, {high})")
        self.low, self.high = float(low), float(high)
        self.antialias = bool(antialias)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:  # noqa: D102
        height, width = v2.query_size(flat_inputs)
        scale = self.low + (self.high - self.low) * torch.rand(()).item()
        return {"size": [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:  # noqa: D102
        return F.resize(inpt, params["size"], antialias=self.antialias)


class ToModelInput(v2.Transform):
    """uint8 image → normalised float tensor; mask → int64 (labels keep their values).

    ``value_scale`` 1/255 gives [0, 1] inputs (ImageNet init: RGB, ImageNet mean/std); ``value_scale`` 1
    with ``bgr=True`` gives Caffe-style inputs (COCO init of DeepLab-v2: BGR, 0–255, mean subtracted).
    Output = ``(x * value_scale - mean) / std`` per channel.
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], *, bgr: bool = False, value_scale: float = 1 / 255
    ) -> None:
        super().__init__()
        self.mean, self.std = list(mean), list(std)
        self.bgr, self.value_scale = bgr, float(value_scale)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:  # noqa: D102
        if isinstance(inpt, tv_tensors.Mask):
            return tv_tensors.wrap(inpt.to(torch.int64), like=inpt)
        if isinstance(inpt, tv_tensors.Image):
            image = inpt.as_subclass(torch.Tensor).to(torch.float32) * self.value_scale
            if self.bgr:
                image = image.flip(-3)
            image = F.normalize(image, self.mean, self.std)
            return tv_tensors.Image(image)
        return inpt


def build_train_transform(
    *,
    crop_size: Sequence[int],
    scale_range: Sequence[float],
    mean: Sequence[float],
    std: Sequence[float],
    base_size: Sequence[int] | None = None,
    flip: bool = True,
    bgr: bool = False,
    value_scale: float = 1 / 255,
    antialias: bool = True,
    pad_fill: str = "mean",
) -> v2.Compose:
    """Training transform: [base resize] → random scale → normalise → crop (pad 0 / 255) → flip.

    ``antialias``: antialiased bilinear downscaling (ours) or plain bilinear (the reference code's tensor
    resize). ``pad_fill="black"`` normalises after the crop and flip instead, so crop padding is raw 0
    (black) as in the reference code; ``"mean"`` pads the normalised image with 0 (the mean colour).
    """
    if pad_fill not in PAD_FILLS:
        raise ValueError(f"pad_fill must be one of {PAD_FILLS}, got {pad_fill!r}")
    steps: list[v2.Transform] = []
    if base_size is not None:
        steps.append(v2.Resize(list(base_size), antialias=antialias))
    steps.append(RandomScale(*scale_range, antialias=antialias))
    normalise = ToModelInput(mean, std, bgr=bgr, value_scale=value_scale)
    if pad_fill == "mean":
        steps.append(normalise)
    steps.append(
        v2.RandomCrop(list(crop_size), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX})
    )
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if pad_fill == "black":
        steps.append(normalise)
    return v2.Compose(steps)


def build_eval_transform(
    *,
    mean: Sequence[float],
    std: Sequence[float],
    base_size: Sequence[int] | None = None,
    bgr: bool = False,
    value_scale: float = 1 / 255,
    antialias: bool = True,
) -> v2.Compose:
    """Evaluation transform: [base resize (labels nearest; ``antialias`` as in training)] → normalise."""
    steps: list[v2.Transform] = []
    if base_size is not None:
        steps.append(v2.Resize(list(base_size), antialias=antialias))
    steps.append(ToModelInput(mean, std, bgr=bgr, value_scale=value_scale))
    return v2.Compose(steps)


def pad_values(mean: Sequence[float], std: Sequence[float], pad_fill: str = "mean", **_: object) -> list[float]:
    """Per-channel value of a padded pixel in normalised space: 0 (``mean``) or raw 0 normalised,
    ``-mean / std`` (``black``, the reference's zero padding before normalisation)."""
    if pad_fill == "black":
        return [-float(m) / float(s) for m, s in zip(mean, std)]
    return [0.0] * len(mean)


def stacks_inputs(norms: Sequence[Mapping[str, Any]]) -> bool:
    """Whether models fed with the input pipelines ``norms`` need one input block each (they differ)."""
    return any(dict(n) != dict(norms[0]) for n in norms[1:])


class StackedModelInput(v2.Transform):
    """:class:`~dmtc.data.transforms.ToModelInput` for several models whose initialisations need different
    input pipelines (DMT's pair: A from COCO/Caffe weights, BGR 0–255; B from ImageNet, RGB [0, 1]).

    The image becomes one normalised 3-channel block per pipeline, stacked on the channel axis (model i
    reads channels ``3i:3i+3``, :meth:`dmtc.module.SegmentationModule.model_input`); masks pass as in
    ``ToModelInput``. The geometric steps after it (crop padded with 0, flip) act on every block alike,
    so each model sees exactly the crop it would see with its own pipeline alone.
    """

    def __init__(self, norms: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        self.parts = [ToModelInput(**dict(n)) for n in norms]

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:  # noqa: D102
        if isinstance(inpt, tv_tensors.Image):
            blocks = [part.transform(inpt, params).as_subclass(torch.Tensor) for part in self.parts]
            return tv_tensors.Image(torch.cat(blocks, dim=-3))
        return self.parts[0].transform(inpt, params)


def stack_model_inputs(transform: v2.Compose, norms: Sequence[Mapping[str, Any]]) -> v2.Compose:
    """``transform`` (built with ``norms[0]``) with its normalisation step replaced by a
    :class:`StackedModelInput` of ``norms`` when they differ; unchanged otherwise."""
    if not stacks_inputs(norms):
        return transform
    steps = [StackedModelInput(norms) if isinstance(t, ToModelInput) else t for t in transform.transforms]
    return v2.Compose(steps)
