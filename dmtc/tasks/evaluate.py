"""Evaluate any checkpoint (ours or a DMT/DMTC release file) on the validation set.

mIoU = mean over classes present in prediction or ground truth of TP / (TP + FP + FN), 255 ignored
(see :mod:`dmtc.metrics`; the official Cityscapes script averages the same classes: a class absent from
both gets NaN there and is skipped, a class only predicted scores 0 in both).

Protocols (``eval.protocol``):

* ``dmt`` — DMT §4.1, the papers' numbers: Cityscapes images resized to ``dataset.eval_size`` 512×1024
  with labels resized nearest; VOC full images zero-padded to 505×505 (``eval.pad_to``), batch 1.
* ``full`` — the original resolution (the Cityscapes benchmark: 1024×2048 labels); the model runs on the
  original image and its logits are upsampled bilinearly to the label size.

``eval.flip`` and ``eval.scales`` add test-time flip / multi-scale (:func:`dmtc.inference.predict_probs`).
``eval.mode=slide`` runs sliding windows of the training crop (stride ⅔ of it, overlapping softmaxes
averaged): the protocol of UniMatch and U2PL, not DMT's (which runs the whole image), for comparing with
papers that report it.
``eval.export_dir`` writes one PNG per image (:mod:`dmtc.export`) at the original image size: Cityscapes
label ids for ``csEvalPixelLevelSemanticLabeling`` (which scores them exactly as ``protocol=full`` does),
palette PNGs otherwise.

The model is rebuilt from ``ckpt`` (:mod:`dmtc.from_checkpoint`): a dmtc checkpoint brings its architecture,
input pipeline and dataset settings; a DMT/DMTC release file is the released two-branch model (set
``backbone.init=coco`` for a COCO-initialised one: the file does not say). Evaluation runs on one device
(no sampler padding), in a plain loop.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from dmtc.data.build import build_layout, pad_fill, prepare_dataset, resize_options
from dmtc.data.datasets import SegmentationDataset
from dmtc.data.loading import loader_options
from dmtc.data.transforms import build_eval_transform, pad_values
from dmtc.errors import DMTCError
from dmtc.export import PredictionWriter
from dmtc.files import RESULTS, write_json
from dmtc.from_checkpoint import restore
from dmtc.inference import predict_probs
from dmtc.metrics import make_miou_metric, predicted_class, summarize
from dmtc.models import model_align_corners, upsample_logits
from dmtc.models.inits import input_normalization
from dmtc.report import format_table
from dmtc.speed import autocast_dtype, configure_cuda, prepare_models, uses_cuda

log = logging.getLogger(__name__)

PROTOCOLS = ("dmt", "full")
MODES = ("whole", "slide")


def eval_settings(cfg: DictConfig) -> dict[str, Any]:
    """The evaluation protocol of ``cfg.eval`` resolved for the dataset: ``mode`` (``whole`` or ``slide``),
    ``window``/``stride`` (slide: default the training crop and ⅔ of it), ``protocol``, ``resize`` (input and
    label size or None), ``pad_to`` (or None), ``scales``, ``flip``, ``export_dir`` (or None)."""
    ev = cfg.get("eval") or {}
    protocol = str(ev.get("protocol", "dmt"))
    if protocol not in PROTOCOLS:
        raise DMTCError(f"eval.protocol={protocol} is not a protocol; use dmt (DMT's, the papers' numbers) or "
                        "full (original resolution, the Cityscapes benchmark)")
    dmt = protocol == "dmt"
    resize = cfg.dataset.get("eval_size") if dmt else None
    pad_to = ev.get("pad_to") if dmt else None
    scales = [float(s) for s in (ev.get("scales") or [1.0])]
    if any(s <= 0 for s in scales):
        raise DMTCError(f"eval.scales={scales}: every scale must be positive (e.g. [0.75,1.0,1.25])")
    mode = str(ev.get("mode", "whole"))
    if mode not in MODES:
        raise DMTCError(f"eval.mode={mode} is not an inference mode; use whole (the model on the whole image, DMT's) "
                        "or slide (sliding windows of the training crop, UniMatch/U2PL's)")
    window = stride = None
    if mode == "slide":
        window = [int(v) for v in (ev.get("slide_window") or cfg.dataset.crop_size)]
        stride = [int(v) for v in (ev.get("slide_stride") or [max(1, w * 2 // 3) for w in window])]
        if len(window) != 2 or len(stride) != 2 or min(window + stride) < 1:
            raise DMTCError(f"eval.slide_window={window} / eval.slide_stride={stride}: give [H, W] of positive sizes")
    return {
        "mode": mode,
        "window": window,
        "stride": stride,
        "protocol": protocol,
        "resize": list(resize) if resize else None,
        "pad_to": list(pad_to) if pad_to else None,
        "scales": scales,
        "flip": bool(ev.get("flip", False)),
        "export_dir": str(ev.get("export_dir")) if ev.get("export_dir") else None,
    }


def build_val_loader(cfg: DictConfig, resize: list[int] | None = None,
                     inputs: dict[str, Any] | None = None) -> DataLoader:
    """DataLoader over the dataset's validation images, resized to ``resize`` (labels nearest) if given,
    normalised as ``inputs`` says (default: the config's ``backbone.init`` pipeline). Each item it yields is a
    list of batches (:func:`_same_size_batches` of ``dataset.val_batch_size`` consecutive images)."""
    prepare_dataset(cfg)
    layout = build_layout(cfg)
    ds = cfg.dataset
    names = layout.names(ds.val_subset)
    layout.check_files(ds.val_subset, names)
    transform = build_eval_transform(base_size=resize, **resize_options(cfg), **(inputs or input_normalization(cfg)))
    dataset = SegmentationDataset(layout, ds.val_subset, names, transform)
    # each loader batch is a list of batches of one image size (full VOC images differ), stacked in the
    # workers and pinned by the loader (loader_options), so the copies to a GPU are asynchronous
    return DataLoader(
        dataset,
        batch_size=int(ds.val_batch_size),
        collate_fn=_same_size_batches,
        **loader_options(int(ds.num_workers), prefetch_factor=ds.get("prefetch_factor")),
    )


def _same_size_batches(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stack consecutive loader items of equal image size into batches (``image``, ``label``, ``size``
    stacked; ``name`` a list)."""
    groups: list[list[dict[str, Any]]] = []
    for item in items:
        if groups and groups[-1][0]["image"].shape == item["image"].shape:
            groups[-1].append(item)
        else:
            groups.append([item])
    return [
        {
            "image": torch.stack([i["image"] for i in group]),
            "label": torch.stack([i["label"] for i in group]),
            "size": torch.stack([i["size"] for i in group]),
            "name": [i["name"] for i in group],
        }
        for group in groups
    ]


def _device_and_autocast(cfg: DictConfig) -> tuple[torch.device, Any]:
    """The evaluation device (CUDA when the run's accelerator allows it) and a context factory: autocast for
    ``precision=16-mixed|bf16-mixed``, else a no-op. ``auto`` (the default of ``dataset=city|voc``, which
    trains under bf16 AMP on a GPU) evaluates in float32 (TF32 on CUDA): reported mIoUs do not depend on
    AMP's rounding of near-tie logits."""
    accelerator = cfg.trainer.get("accelerator", "auto")
    device = torch.device("cuda" if uses_cuda(accelerator) else "cpu")
    precision = str(cfg.trainer.get("precision", "32-true"))
    dtype = autocast_dtype("32-true" if precision == "auto" else precision, device)
    if dtype is None:
        return device, contextlib.nullcontext
    return device, lambda: torch.autocast(device.type, dtype=dtype)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt`` on the validation set; write and return ``results.json``'s contents."""
    if not cfg.get("ckpt"):
        raise DMTCError("no checkpoint given: run `python evaluate.py ckpt=/path/to/checkpoint`")
    ckpt = Path(cfg.ckpt)
    start = time.perf_counter()
    # architecture, input pipeline and (where recorded) dataset come from the checkpoint
    restored = restore(cfg, ckpt, cfg.get("model_key"))
    cfg, model = restored.cfg, restored.model
    settings = eval_settings(cfg)
    loader = build_val_loader(cfg, settings["resize"], restored.inputs)
    writer = None
    if settings["export_dir"]:
        writer = PredictionWriter(settings["export_dir"], cityscapes=cfg.dataset.get("label_map") == "cityscapes",
                                  num_classes=int(cfg.dataset.num_classes))
    fill = pad_values(**restored.inputs, pad_fill=pad_fill(cfg))  # VOC's 505×505 and sliding-window padding
    configure_cuda(cfg)
    device, autocast = _device_and_autocast(cfg)
    model = prepare_models(cfg, {"model": model})["model"]  # channels_last on CUDA, model.compile
    model.to(device).eval()
    metric = make_miou_metric(int(cfg.dataset.num_classes)).to(device)
    log.info("evaluating %d images, protocol %s (input %s, pad %s, scales %s, flip %s, %s)", len(loader.dataset),
             settings["protocol"], settings["resize"] or "original size", settings["pad_to"], settings["scales"],
             settings["flip"], f"sliding window {settings['window']} stride {settings['stride']}"
             if settings["mode"] == "slide" else "whole image")
    with torch.no_grad():
        for batch in (b for batches in loader for b in batches):
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            with autocast():
                probs = predict_probs(model, images, labels.shape[-2:], scales=settings["scales"],
                                      flip=settings["flip"], pad_to=settings["pad_to"], window=settings["window"],
                                      stride=settings["stride"], pad_value=fill)
            metric.update(predicted_class(probs), labels)
            if writer is not None:
                for i, name in enumerate(batch["name"]):
                    size = tuple(int(s) for s in batch["size"][i])
                    p = probs[i : i + 1]
                    if tuple(p.shape[-2:]) != size:  # dmt protocol: back to the original image size
                        p = upsample_logits(p, size, align_corners=model_align_corners(model))
                    writer.write(name, predicted_class(p[0], dim=0).cpu().numpy())
    summary = summarize(metric.confmat.detach().cpu(), list(cfg.dataset.class_names))
    results = {
        "task": "evaluate",
        "dataset": cfg.dataset.name,
        "backbone": cfg.backbone.name,
        "checkpoint": str(ckpt.resolve()),
        "model_key": restored.model_key,
        "miou": summary["miou"],
        "per_class_iou": summary["per_class_iou"],
        "num_val": len(loader.dataset),
        "eval": {**settings, "input_init": restored.init, "pad_fill": pad_fill(cfg), **resize_options(cfg)},
        "model": {**restored.architecture, "checkpoint_kind": restored.kind},
        "dataset_settings": restored.dataset_source,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    if writer is not None:
        log.info("wrote %d predictions to %s", writer.written, writer.directory)
    path = write_json(Path(cfg.paths.output_dir) / RESULTS, results)
    title = f"{cfg.dataset.name} val IoU (%) of {ckpt.name}, protocol {settings['protocol']}"
    print(format_table(title, summary["per_class_iou"], summary["miou"]))
    log.info("results written to %s (eval settings %s)", path, OmegaConf.to_yaml(OmegaConf.create(settings)).strip())
    return results
