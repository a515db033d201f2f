"""Where dmtc stands on a device, in one command: training, labeling, evaluation and input speed, and the
projected wall time of the published DMT/DMTC protocols.

    python benchmarks/gpu_check.py                      # the CUDA device: ≤ 8 min on one H100/H200
    python benchmarks/gpu_check.py --device cpu --quick # tiny sizes: the test suite runs this (tests/test_gpu_check.py)
    python benchmarks/gpu_check.py --out gpu_check.json --budget-s 420

Everything runs through the project's own code: models from the composed configs (``dataset=voc|city``,
``method=dmt|dmtc``, :func:`dmtc.dmt.pair.build_pair`, :func:`dmtc.speed.prepare_models`), the real
:class:`dmtc.dmt.mutual.MutualTrainingModule` driven by a real Lightning Trainer
(:func:`dmtc.trainer.build_trainer`: precision, TF32, cuDNN autotuning as a run sets them), the real
labeling pass (:func:`dmtc.dmt.labeling.predict_to_store`: histogram on the device, background PNG writes),
the real inference (:func:`dmtc.inference.predict_probs` + the validation metric) and the real input
pipeline (:func:`dmtc.data.build.build_datamodule` with ``dataset.resized_cache=true`` on a synthetic
Cityscapes-layout tree in a temp folder). It prints one table per section and writes everything to JSON
(``--out``, default ``gpu_check-<device>.json`` in the working directory) with the date, the machine
(:mod:`machine`) and the command.

**Training** (section ``train``): DeepLab-v2 ResNet-101 (the released DMT model: ASPP d6 + d12) at VOC's
321×321 and Cityscapes' 256×512 crops; steps ``warmup`` (DMT's warm-up, supervised: each model of the pair
its own labeled batch of 8, cross-entropy; DMTC adds ReCo on the ground truth, weight 1.0) and ``mutual``
(a DMT phase: each model 2 + 6 (City) or 1 + 7 (VOC) images, dynamic mutual loss on the other model's
pseudo labels; DMTC adds ReCo, weight 0.1); DMTC off (``method=dmt``) and on (``method=dmtc``); modes
``fp32`` (``precision=32-true``, TF32 on CUDA), ``amp`` (``precision=auto``: bf16-mixed on Ampere and newer),
``amp_cl`` (+ ``model.channels_last``: the CUDA default) and ``amp_cl_compile`` (+ ``model.compile``).
Per row: step time, ``images_per_s`` = 8 × steps/s (the protocol's batch per model; each step trains both
models), FLOPs per step (``torch.utils.flop_counter.FlopCounterMode`` over one eager step, forward and
backward of both models), achieved TFLOP/s, **MFU = flops_per_step / step_time / peak_flops** with
``peak_flops`` the device's dense bf16/fp16 tensor-core peak (:data:`PEAK_TFLOPS`, by
``torch.cuda.get_device_name()``; None on a CPU or an unknown GPU; the fp32 rows are measured against the
same peak), peak memory (``torch.cuda.max_memory_allocated``) and the host synchronisations of one step
(CUDA's sync debug mode). Compile rows run last, after the other sections, and are skipped
(``"skipped": "time budget"``) when what is left of ``--budget-s`` (default 420 s) is less than the longest
compile row so far (at first 90 s), so the whole check stays within about the budget.

**Labeling**: images/s of :func:`~dmtc.dmt.labeling.predict_to_store` at 512×1024 (float32, as labeling
always runs), the model of the City rows. **Evaluation**: images/s of :func:`~dmtc.inference.predict_probs`
+ the confusion-matrix update at 512×1024 (DMT's protocol) and 1024×2048 (the benchmark's), flip off/on,
float32 and AMP, batch 4 (``dataset.val_batch_size``). **Input**: samples/s of the Cityscapes warm-up
training loader with the resized cache (``dataset.num_workers`` workers, then all cores), beside the
model's demand (16 samples per warm-up step: two streams of 8) at the default mode.

**Projection** of the full protocols (City 1/8, VOC 1/20; DMT and DMTC) at the device's default mode
(CUDA: ``amp_cl``; CPU: ``fp32``), from the configs' schedules and DMT's image counts (DESIGN §3)::

    T = S_w / r_w + P · (S_p / r_m + 2 · U / r_l) + V · 2 · N_val / r_e

with S_w = warm-up steps (max_epochs · ⌊L / batch⌋), S_p = steps per phase (epochs · ⌊U / unlabeled batch⌋),
P phases, L / U labeled / unlabeled images, r_w / r_m the warm-up / mutual steps/s, r_l labeling and r_e
evaluation images/s (AMP, no flip: validation runs at the training precision), V validations (every
val_check_interval steps, after each stage's last step and the re-validation of its best checkpoints; two
models each, the ensemble is free). VOC's full images (~500×375) are priced at the 512×1024 rates scaled by
their pixel count (an estimate).

``--quick`` shrinks everything (resnet_tiny, 33×33 / 32×64 crops, 32×64 labeling, 32×64 / 64×128
evaluation, 128×256 originals) so that ``--device cpu --quick`` checks every code path in well under a
minute or two; its figures mean nothing. With ``--quick`` on a CPU the compile rows use the ``eager``
backend (TorchDynamo's graph capture without code generation: inductor's C++ build takes ~40 s per graph
there; ``tests/test_speed.py`` runs a short training with inductor).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from machine import cpu_model  # benchmarks/machine.py (this folder is on sys.path)
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

import dmtc.config  # noqa: F401  (resolvers)
from dmtc.data.loading import loader_options
from dmtc.data.splits import num_labeled, split_ratio
from dmtc.dmt.curriculum import ConfidenceHistogram
from dmtc.dmt.labeling import predict_to_store
from dmtc.dmt.mutual import MutualTrainingModule
from dmtc.dmt.pair import build_pair
from dmtc.dmt.store import PseudoLabelStore
from dmtc.inference import predict_probs
from dmtc.metrics import make_miou_metric, predicted_class
from dmtc.settings import contrastive_settings, optim_settings, phase_settings
from dmtc.speed import prepare_models
from dmtc.trainer import build_trainer, module_kwargs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

#: Dense (no sparsity) bf16/fp16 tensor-core peak, TFLOP/s, by a substring of ``torch.cuda.get_device_name()``;
#: the longest matching key wins (vendor data sheets; GeForce cards: fp16 with fp32 accumulation).
PEAK_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "H200 NVL": 835.0,
    "H200": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,  # "NVIDIA H100 80GB HBM3": the SXM part
    "H800": 989.4,
    "GH200": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.1,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "A30": 165.0,
    "RTX 6000 Ada": 364.2,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}

#: DMT's image counts (DESIGN §3): training base list and validation images
DATASET_IMAGES = {"city": {"train": 2975, "val": 500, "split": "8"},
                  "voc": {"train": 10582, "val": 1449, "split": "20"}}
#: VOC's images are ~500×375: their labeling and evaluation are priced at the 512×1024 rates × this pixel ratio
VOC_PIXEL_RATIO = (512 * 1024) / (500 * 375)

MODES = {  # name: (precision, channels_last, compile)
    "fp32": ("32-true", False, False),
    "amp": ("auto", False, False),
    "amp_cl": ("auto", True, False),
    "amp_cl_compile": ("auto", True, True),
}


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16/fp16 peak (:data:`PEAK_TFLOPS`), None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_TFLOPS if key in name]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated memory since :func:`reset_peak`, GiB (None on a CPU: its allocator keeps no statistics)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def count_host_syncs(device: torch.device) -> Iterator[list[int]]:
    """Count CUDA host synchronisations inside the block (sync debug mode "warn", one warning each); yields a
    one-element list filled on exit (stays empty on a CPU)."""
    box: list[int] = []
    if device.type != "cuda":
        yield box
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield box
        finally:
            torch.cuda.set_sync_debug_mode("default")
    box.append(sum("synchroniz" in str(w.message) for w in caught))


# ------------------------------------------------------------------------------------------ configs
class Setup:
    """Sizes and backbone of a full or a quick check."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.backbone = "resnet_tiny" if quick else "resnet101"
        self.crops = {"voc": (33, 33), "city": (32, 64)} if quick else {"voc": (321, 321), "city": (256, 512)}
        self.label_size = (32, 64) if quick else (512, 1024)
        self.eval_sizes = [(32, 64), (64, 128)] if quick else [(512, 1024), (1024, 2048)]
        self.label_images = 8 if quick else 48
        self.eval_images = 8 if quick else 24
        self.original_size = (128, 256) if quick else (1024, 2048)  # the input check's synthetic originals
        self.base_size = (64, 128) if quick else (512, 1024)
        self.input_crop = (32, 64) if quick else (256, 512)
        self.input_images = 16 if quick else 48


def compose_cfg(tmp: Path, overrides: list[str]) -> DictConfig:
    """The ``train`` config with ``overrides`` as ``python train.py`` composes it, writing under ``tmp``."""
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.log_dir={tmp / 'outputs'}", f"paths.cache_dir={tmp / 'cache'}",
                                          *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp / "run")
    HydraConfig.instance().set_config(cfg)
    return cfg


_COMPOSED: dict[tuple[str, ...], DictConfig] = {}


def model_cfg(tmp: Path, setup: Setup, dataset: str, device: torch.device, with_dmtc: bool, mode: str,
              compile_backend: str | None) -> DictConfig:
    """The run config of one training row: ``dataset=<dataset> split=<DMT's> method=dmt|dmtc`` on the
    check's backbone with a seeds pair (no weight files), then the mode's ``precision``,
    ``model.channels_last`` and ``model.compile`` (composed once per dataset and method)."""
    key = (dataset, str(with_dmtc))
    if key not in _COMPOSED:
        _COMPOSED[key] = compose_cfg(tmp, [
            f"dataset={dataset}", f"split={DATASET_IMAGES[dataset]['split']}",
            f"method={'dmtc' if with_dmtc else 'dmt'}", f"backbone={setup.backbone}", "backbone.init=none",
            "method.pair_init=seeds", f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
            "logger=none", "callbacks=none"])
    cfg = copy.deepcopy(_COMPOSED[key])
    precision, channels_last, compiled = MODES[mode]
    with open_dict(cfg):
        cfg.trainer.precision = precision
        cfg.model.channels_last = channels_last
        cfg.model.compile = ({"backend": compile_backend} if compile_backend else True) if compiled else False
    return cfg


# ------------------------------------------------------------------------------------------ training
def class_map(shape: tuple[int, int, int], classes: int, g: torch.Generator) -> torch.Tensor:
    """N×H×W labels made of blocks of random classes (every class present, region sizes like a street scene's)."""
    n, h, w = shape
    coarse = torch.randint(0, classes, (n, 1, max(1, h // 16), max(1, w // 16)), generator=g).float()
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="nearest")[:, 0].long()


def make_batch(step: str, crop: tuple[int, int], classes: int, sizes: tuple[int, int], seed: int) -> dict[str, Any]:
    """One training batch of the independent-streams pair (the default): ``{"a": ..., "b": ...}``; warm-up:
    each model 8 labeled images; mutual: ``sizes`` = (labeled, unlabeled) images with both models' pseudo
    labels (15% of pixels ignored, as a curriculum would) and confidences."""
    g = torch.Generator().manual_seed(seed)
    h, w = crop

    def labeled(n: int) -> dict[str, torch.Tensor]:
        return {"image": torch.randn(n, 3, h, w, generator=g), "label": class_map((n, h, w), classes, g)}

    streams = {}
    for key in ("a", "b"):
        if step == "warmup":
            streams[key] = labeled(sum(sizes))
            continue
        unl: dict[str, torch.Tensor] = {"image": torch.randn(sizes[1], 3, h, w, generator=g)}
        for other in ("a", "b"):
            label = class_map((sizes[1], h, w), classes, g)
            conf = torch.rand(sizes[1], h, w, generator=g).pow(0.3)
            unl[f"label_{other}"] = torch.where(conf < 0.15 ** 0.3, 255, label)
            unl[f"conf_{other}"] = conf
        streams[key] = {"labeled": labeled(sizes[0]), "unlabeled": unl}
    return streams


class Batches(Dataset):
    """A few prebuilt batches, cycled (a DataLoader with ``batch_size=None``)."""

    def __init__(self, batches: list[dict[str, Any]], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batches[index % len(self.batches)]


class StepClock(L.Callback):
    """The steps of one training row, in order: ``warmup`` untimed steps (cuDNN autotuning, compilation; on
    eager rows the last of them counts FLOPs under ``FlopCounterMode``), ``timed`` steps timed as one block
    (a device sync at each end only: kernels pipeline as in a run), then on CUDA one step whose host
    synchronisations are counted. :attr:`total` is the number of steps the Trainer must run."""

    def __init__(self, device: torch.device, warmup: int, timed: int, count_flops: bool) -> None:
        self.device, self.timed, self.count_flops = device, timed, count_flops
        self.warmup = max(int(warmup), 1 if count_flops else 0)
        self.first_timed = self.warmup
        self.sync_step = self.warmup + timed if device.type == "cuda" else None
        self.total = self.warmup + timed + (1 if self.sync_step is not None else 0)
        self.flops: int | None = None
        self.seconds = self.start = 0.0
        self.peak: float | None = None
        self.syncs: int | None = None
        self._flop_mode: FlopCounterMode | None = None
        self._sync_ctx: Any = None
        self._sync_box: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # noqa: D102
        if self.count_flops and batch_idx == self.warmup - 1:
            self._flop_mode = FlopCounterMode(display=False)
            self._flop_mode.__enter__()
        if batch_idx == self.first_timed:
            sync(self.device)
            reset_peak(self.device)
            self.start = time.perf_counter()
        elif batch_idx == self.sync_step:
            sync(self.device)
            self._sync_ctx = count_host_syncs(self.device)
            self._sync_box = self._sync_ctx.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # noqa: D102
        if self._flop_mode is not None and batch_idx == self.warmup - 1:
            self._flop_mode.__exit__(None, None, None)
            self.flops = int(self._flop_mode.get_total_flops())
            self._flop_mode = None
        if batch_idx == self.first_timed + self.timed - 1:
            sync(self.device)
            self.seconds = time.perf_counter() - self.start
            self.peak = peak_gib(self.device)
        elif batch_idx == self.sync_step and self._sync_ctx is not None:
            self._sync_ctx.__exit__(None, None, None)
            self.syncs = self._sync_box[0] if self._sync_box else None
            self._sync_ctx = None


def train_row(tmp: Path, setup: Setup, device: torch.device, dataset: str, step: str, with_dmtc: bool, mode: str,
              timed: int, flops: int | None, compile_backend: str | None, peak: float | None,
              warmup: int = 2) -> dict[str, Any]:
    """Time one training configuration (module docstring); ``flops`` reuses the eager count of the same step."""
    cfg = model_cfg(tmp, setup, dataset, device, with_dmtc, mode, compile_backend)
    L.seed_everything(0, verbose=False)
    models = prepare_models(cfg, build_pair(cfg))
    contrastive = contrastive_settings(cfg, warmup=step == "warmup")
    if step == "warmup":
        module = MutualTrainingModule(models, stage="warmup", contrastive=contrastive,
                                      **module_kwargs(cfg, optim_settings(cfg)))
        sizes = (int(cfg.dataset.batch_size), 0)
    else:
        p = phase_settings(cfg)
        module = MutualTrainingModule(models, stage="mutual", gamma1=p.gamma1, gamma2=p.gamma2,
                                      contrastive=contrastive, **module_kwargs(cfg, optim_settings(cfg, lr=p.lr)))
        sizes = (p.labeled_batch_size, p.unlabeled_batch_size)
    classes = int(cfg.dataset.num_classes)
    batches = [make_batch(step, setup.crops[dataset], classes, sizes, seed) for seed in range(2)]
    clock = StepClock(device, warmup, timed, count_flops=flops is None)
    total = clock.total
    loader = DataLoader(Batches(batches, total), batch_size=None, **loader_options(0))
    trainer = build_trainer(cfg, loggers=[], exclude_callbacks=("progress_bar",), extra_callbacks=[clock],
                            max_steps=total, max_epochs=-1,
                            limit_val_batches=0, num_sanity_val_steps=0, val_check_interval=100_000,
                            check_val_every_n_epoch=None, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, devices=1, default_root_dir=str(tmp / "run"))
    trainer.fit(module, train_dataloaders=loader)
    flops = clock.flops if flops is None else flops
    step_s = clock.seconds / timed
    images = sum(sizes)
    row = {"dataset": dataset, "crop": list(setup.crops[dataset]), "step": step, "dmtc": with_dmtc, "mode": mode,
           "precision": str(trainer.precision), "channels_last": MODES[mode][1], "compile": MODES[mode][2],
           "batch_per_model": {"labeled": sizes[0], "unlabeled": sizes[1]}, "step_ms": round(1000 * step_s, 2),
           "steps_per_s": round(1 / step_s, 3), "images_per_s": round(images / step_s, 2),
           "flops_per_step": flops, "tflops_per_s": round(flops / step_s / 1e12, 3),
           "mfu": round(flops / step_s / (peak * 1e12), 4) if peak else None,
           "peak_memory_gib": clock.peak, "host_syncs_per_step": clock.syncs, "skipped": None}
    del trainer, module, models
    free_memory(device)
    return row


# ------------------------------------------------------------------------------------------ labeling / evaluation
class RandomImages(Dataset):
    """``count`` items cycling through 4 normalised random images of ``size``, made once (the labeling
    section measures the model's rate; the input section the decoder's)."""

    def __init__(self, count: int, size: tuple[int, int]) -> None:
        g = torch.Generator().manual_seed(0)
        self.count, self.size = count, size
        self.images = [torch.randn(3, *size, generator=g) for _ in range(4)]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i % 4], "name": f"city/img_{i:04d}", "size": torch.tensor(self.size)}


def eval_model(tmp: Path, setup: Setup, device: torch.device) -> torch.nn.Module:
    """Model A of the City DMTC pair in the device's default layout (channels_last on CUDA), eval mode."""
    cfg = model_cfg(tmp, setup, "city", device, True, "amp_cl" if device.type == "cuda" else "fp32", None)
    L.seed_everything(0, verbose=False)
    return prepare_models(cfg, build_pair(cfg))["a"].to(device).eval()


def labeling_row(tmp: Path, setup: Setup, device: torch.device, model: torch.nn.Module) -> dict[str, Any]:
    """Images/s of the real labeling pass at ``setup.label_size`` (float32): a second pass over a loader with
    persistent workers (the first warms up cuDNN and starts the workers)."""
    batch = 4
    loader = DataLoader(RandomImages(setup.label_images, setup.label_size), batch_size=batch,
                        **loader_options(2, prefetch_factor=4))
    predict_to_store(model, loader, PseudoLabelStore(tmp / "warm"), ConfidenceHistogram(model.num_classes), device)
    store, hist = PseudoLabelStore(tmp / "labels"), ConfidenceHistogram(model.num_classes)
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    predict_to_store(model, loader, store, hist, device)
    sync(device)
    seconds = time.perf_counter() - start
    assert len(list((tmp / "labels" / "label").rglob("*.png"))) == setup.label_images
    return {"size": list(setup.label_size), "batch": batch, "precision": "32-true", "images": setup.label_images,
            "images_per_s": round(setup.label_images / seconds, 2), "peak_memory_gib": peak_gib(device)}


@torch.no_grad()
def evaluate_batch(model: torch.nn.Module, metric: Any, images: torch.Tensor, labels: torch.Tensor,
                   dtype: torch.dtype | None, flip: bool) -> None:
    """What evaluate.py does per batch: probabilities (autocast when ``dtype``), argmax, metric update."""
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        probs = predict_probs(model, images, labels.shape[-2:], flip=flip)
    metric.update(predicted_class(probs), labels)


def evaluation_rows(setup: Setup, device: torch.device, model: torch.nn.Module) -> list[dict[str, Any]]:
    """Images/s of predict_probs + the metric update per size, flip and precision (batch 4)."""
    rows = []
    batch = 4
    metric = make_miou_metric(model.num_classes).to(device)
    g = torch.Generator().manual_seed(0)
    for size in setup.eval_sizes:
        images = torch.randn(batch, 3, *size, generator=g).to(device)
        labels = class_map((batch, *size), model.num_classes, g).to(device)
        for precision in ("32-true", "bf16-mixed" if device.type == "cpu" or torch.cuda.is_bf16_supported()
                          else "16-mixed"):
            dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
            for flip in (False, True):
                evaluate_batch(model, metric, images, labels, dtype, flip)  # warm-up (cuDNN autotuning)
                sync(device)
                reset_peak(device)
                repeats = max(1, setup.eval_images // batch)
                start = time.perf_counter()
                for _ in range(repeats):
                    evaluate_batch(model, metric, images, labels, dtype, flip)
                sync(device)
                seconds = time.perf_counter() - start
                rows.append({"size": list(size), "flip": flip, "precision": precision, "batch": batch,
                             "images_per_s": round(repeats * batch / seconds, 2), "peak_memory_gib": peak_gib(device)})
        del images, labels
        free_memory(device)
    return rows


# ------------------------------------------------------------------------------------------ input pipeline
def write_city_tree(root: Path, count: int, size: tuple[int, int]) -> None:
    """A synthetic Cityscapes layout (``leftImg8bit``/``gtFine``, two cities): noisy gradients with shapes
    (PNGs about as costly to decode as real ones) and block label-id maps."""
    rng = np.random.default_rng(0)
    h, w = size
    ids = np.array([0, 1, 7, 8, 11, 17, 21, 23, 24, 26, 33], dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for subset, n in (("train", count), ("val", 4)):
        for i in range(n):
            city = ("aachen", "bochum")[i % 2]
            stem = f"{city}_{i:06d}_000019"
            for folder in ("leftImg8bit", "gtFine"):
                (root / folder / subset / city).mkdir(parents=True, exist_ok=True)
            base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.int16)
            image = np.clip(base + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8)
            for _ in range(12):
                x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(4, max(5, h // 6)))
                cv2.circle(image, (x, y), r, tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
            blocks = ids[rng.integers(0, len(ids), (max(1, h // 32), max(1, w // 32)))]
            label = cv2.resize(blocks, (w, h), interpolation=cv2.INTER_NEAREST)
            cv2.imwrite(str(root / "leftImg8bit" / subset / city / f"{stem}_leftImg8bit.png"), image)
            cv2.imwrite(str(root / "gtFine" / subset / city / f"{stem}_gtFine_labelIds.png"), label)


def input_rows(tmp: Path, setup: Setup) -> list[dict[str, Any]]:
    """Samples/s of the City warm-up training loader with the resized cache (one model's stream), with the
    config's 4 workers and with half the cores (what each of the pair's two streams can have)."""
    from dmtc.data.build import build_datamodule

    root = tmp / "cityscapes"
    write_city_tree(root, setup.input_images, setup.original_size)
    rows = []
    cores = os.cpu_count() or 1
    for workers in sorted({min(4, cores), max(1, cores // 2)}):
        b, c = setup.base_size, setup.input_crop
        cfg = compose_cfg(tmp, ["dataset=city", f"dataset.root={root}", "split=1", "backbone=resnet_tiny",
                                "dataset.resized_cache=true", f"dataset.num_workers={workers}",
                                f"dataset.base_size=[{b[0]},{b[1]}]", f"dataset.eval_size=[{b[0]},{b[1]}]",
                                f"dataset.crop_size=[{c[0]},{c[1]}]", "dataset.batch_size=8", "logger=none"])
        datamodule, _ = build_datamodule(cfg)
        loader = datamodule.train_dataloader()
        next(iter(loader))  # workers started, first batch: not counted
        samples, start = 0, time.perf_counter()
        while samples < max(3 * setup.input_images, 256):  # whole epochs (persistent workers) until enough
            for batch in loader:
                samples += int(batch["image"].shape[0])
        seconds = time.perf_counter() - start
        rows.append({"workers": workers, "batch": 8, "resized_cache": True, "original_size": list(setup.original_size),
                     "base_size": list(b), "crop": list(c), "samples_per_s": round(samples / seconds, 1)})
        del loader, datamodule
    return rows


# ------------------------------------------------------------------------------------------ projection
def protocol_steps(tmp: Path, dataset: str) -> dict[str, Any]:
    """The schedule of DMT's published protocol for ``dataset`` (City 1/8, VOC 1/20) from the composed config."""
    info = DATASET_IMAGES[dataset]
    cfg = compose_cfg(tmp, [f"dataset={dataset}", f"split={info['split']}", "method=dmtc"])
    labeled = num_labeled(info["train"], split_ratio(info["split"]))
    unlabeled = info["train"] - labeled
    p = phase_settings(cfg)
    warmup_steps = int(cfg.trainer.max_epochs) * (labeled // int(cfg.dataset.batch_size))
    phase_steps = p.epochs * (unlabeled // p.unlabeled_batch_size)
    if p.max_steps > 0:
        phase_steps = min(phase_steps, p.max_steps)
    phases = len(list(cfg.method.ratios))

    def validations(steps: int, every: int | None) -> int:
        grid = steps // every if every else 1
        return grid + (1 if every and steps % every else 0) + 1  # + the last step, + re-validation of the best

    vals = validations(warmup_steps, int(cfg.trainer.val_check_interval)) + phases * validations(
        phase_steps, p.val_check_interval)
    return {"labeled": labeled, "unlabeled": unlabeled, "val_images": info["val"], "warmup_steps": warmup_steps,
            "phase_steps": phase_steps, "phases": phases, "validations": vals,
            "batch": int(cfg.dataset.batch_size),
            "phase_batch": [p.labeled_batch_size, p.unlabeled_batch_size]}


def projection(tmp: Path, train: list[dict[str, Any]], labeling: dict[str, Any], evaluation: list[dict[str, Any]],
               mode: str) -> dict[str, Any]:
    """Projected wall time of City 1/8 and VOC 1/20, DMT and DMTC (module docstring's formula), in hours."""
    out: dict[str, Any] = {"mode": mode, "formula": "T = S_w/r_w + P*(S_p/r_m + 2*U/r_l) + V*2*N_val/r_e",
                           "note": "VOC labeling and evaluation: the 512x1024 rates x (512*1024)/(500*375)"}
    first_eval = evaluation[0]["size"]
    amp_eval = [r for r in evaluation if r["size"] == first_eval and not r["flip"] and r["precision"] != "32-true"]
    r_e = amp_eval[0]["images_per_s"]
    r_l = labeling["images_per_s"]
    for dataset, name in (("city", "city-1/8"), ("voc", "voc-1/20")):
        s = protocol_steps(tmp, dataset)
        scale = VOC_PIXEL_RATIO if dataset == "voc" else 1.0
        for method, with_dmtc in (("dmt", False), ("dmtc", True)):
            rate = {r["step"]: r["steps_per_s"] for r in train
                    if r["dataset"] == dataset and r["dmtc"] == with_dmtc and r["mode"] == mode and not r["skipped"]}
            if "warmup" not in rate or "mutual" not in rate:
                out.setdefault(name, {"schedule": s})[method] = None
                continue
            parts = {"warmup_h": s["warmup_steps"] / rate["warmup"] / 3600,
                     "phases_train_h": s["phases"] * s["phase_steps"] / rate["mutual"] / 3600,
                     "labeling_h": s["phases"] * 2 * s["unlabeled"] / (r_l * scale) / 3600,
                     "validation_h": s["validations"] * 2 * s["val_images"] / (r_e * scale) / 3600}
            parts = {k: round(v, 3) for k, v in parts.items()}
            out.setdefault(name, {"schedule": s})[method] = {
                "total_h": round(sum(parts.values()), 2), **parts, "r_w": rate["warmup"], "r_m": rate["mutual"],
                "r_l": round(r_l * scale, 2), "r_e": round(r_e * scale, 2)}
    return out


# ------------------------------------------------------------------------------------------ report
def table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = [f"\n### {title}\n", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append("–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny backbone and sizes (CI, CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per row (default 10, quick 1)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds for the whole check: compile rows that would exceed it are skipped")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; "
                        "eager, i.e. TorchDynamo's capture only, with --quick on a CPU)")
    parser.add_argument("--sections", default="train,labeling,evaluation,input",
                        help="comma-separated subset of train,labeling,evaluation,input")
    parser.add_argument("--out", default=None, help="JSON output (default gpu_check-<device>.json)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 with --device cpu --quick, where two threads on "
                        "a shared CPU make every small op wait for a descheduled thread: 10-40x slower steps)")
    args = parser.parse_args()
    threads = args.threads or (1 if args.quick and args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --quick)")
    device = torch.device(args.device)
    setup = Setup(args.quick)
    timed = args.steps or (1 if args.quick else 10)
    warmup = 0 if args.quick else 3  # quick: no untimed step (a FLOP-counting one where needed)
    backend = args.compile_backend or ("eager" if args.quick and device.type == "cpu" else None)
    sections = set(args.sections.split(","))
    started = time.perf_counter()
    peak = peak_tflops(device)
    report: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/gpu_check.py " + shlex.join(sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "lightning": L.__version__, "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
                    "cuda": torch.version.cuda if device.type == "cuda" else None, "peak_tflops": peak,
                    "load_average": list(os.getloadavg())},
        "settings": {"quick": args.quick, "backbone": setup.backbone, "timed_steps": timed, "warmup_steps": warmup,
                     "cpu_threads": torch.get_num_threads(),
                     "compile_backend": backend or "inductor", "budget_s": args.budget_s},
        "train": [], "labeling": None, "evaluation": [], "input": [], "projection": None,
    }
    out = Path(args.out or f"gpu_check-{device.type}.json")
    default_mode = "amp_cl" if device.type == "cuda" else "fp32"
    with tempfile.TemporaryDirectory(prefix="dmtc-gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        grid = [(d, st, m, mode) for d in ("voc", "city") for st in ("warmup", "mutual") for m in (False, True)
                for mode in MODES]
        flops: dict[tuple[str, str, bool], int] = {}
        compile_cost = [90.0 if device.type == "cuda" else 10.0]  # seconds a compile row may take: the largest seen

        def run_rows(compiled: bool) -> None:
            for dataset, step, with_dmtc, mode in grid:
                if MODES[mode][2] != compiled:
                    continue
                if compiled and args.budget_s - (time.perf_counter() - started) < max(compile_cost):
                    report["train"].append({"dataset": dataset, "step": step, "dmtc": with_dmtc, "mode": mode,
                                            "skipped": "time budget"})
                    continue
                key, row_start = (dataset, step, with_dmtc), time.perf_counter()
                row = train_row(tmp, setup, device, dataset, step, with_dmtc, mode, timed, flops.get(key), backend,
                                peak, warmup=max(warmup, 1) if compiled else warmup)
                if compiled:
                    compile_cost.append(time.perf_counter() - row_start)
                    torch.compiler.reset()  # drop this row's compiled graphs (the on-disk cache stays)
                flops.setdefault(key, row["flops_per_step"])
                report["train"].append(row)
                print(f"train {dataset} {step} dmtc={with_dmtc} {mode}: {row['images_per_s']} img/s, "
                      f"{row['tflops_per_s']} TFLOP/s, MFU {row['mfu']}", flush=True)

        if "train" in sections:  # eager rows first: the projection's default mode is among them
            run_rows(compiled=False)
        model = eval_model(tmp, setup, device) if {"labeling", "evaluation"} & sections else None
        if "labeling" in sections:
            report["labeling"] = labeling_row(tmp, setup, device, model)
        if "evaluation" in sections:
            report["evaluation"] = evaluation_rows(setup, device, model)
        del model
        free_memory(device)
        if "input" in sections:
            report["input"] = input_rows(tmp, setup)
            demand = [r for r in report["train"] if r.get("dataset") == "city" and r.get("step") == "warmup"
                      and r.get("dmtc") and r.get("mode") == default_mode and not r.get("skipped")]
            need = demand[0]["images_per_s"] if demand else None  # per stream: each model has its own loader
            for row in report["input"]:
                row["model_demand_samples_per_s"] = need
                row["input_bound"] = None if need is None else row["samples_per_s"] < need
        if "train" in sections:  # compile rows last, while the time budget lasts
            run_rows(compiled=True)
        if report["train"] and report["labeling"] and report["evaluation"]:
            report["projection"] = projection(tmp, report["train"], report["labeling"], report["evaluation"],
                                              default_mode)
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(report, indent=1))
    print_report(report)
    print(f"\nwrote {out} ({report['elapsed_s']} s)")
    return 0


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\n{report['date'][:10]}, {m['cpu']} ({m['cores']} cores), {m['device_name']}, torch {m['torch']}, "
          f"Lightning {m['lightning']}, peak {m['peak_tflops']} TFLOP/s, load {m['load_average'][0]:.1f}; "
          f"`{report['command']}`")
    print(table("Training (both models of the pair per step)", report["train"],
                ["dataset", "step", "dmtc", "mode", "precision", "step_ms", "images_per_s", "tflops_per_s", "mfu",
                 "peak_memory_gib", "host_syncs_per_step", "skipped"]))
    if report["labeling"]:
        print(table("Labeling (predict_to_store, float32)", [report["labeling"]],
                    ["size", "batch", "images_per_s", "peak_memory_gib"]))
    print(table("Evaluation (predict_probs + metric)", report["evaluation"],
                ["size", "flip", "precision", "batch", "images_per_s", "peak_memory_gib"]))
    print(table("Input: City warm-up loader, resized cache", report["input"],
                ["workers", "original_size", "base_size", "crop", "samples_per_s", "model_demand_samples_per_s",
                 "input_bound"]))
    proj = report["projection"]
    if proj:
        rows = [{"protocol": name, "method": method, **(v or {})} for name in ("city-1/8", "voc-1/20")
                for method, v in proj[name].items() if method in ("dmt", "dmtc")]
        print(table(f"Projected protocol wall time, mode {proj['mode']} ({proj['formula']})", rows,
                    ["protocol", "method", "total_h", "warmup_h", "phases_train_h", "labeling_h", "validation_h"]))


if __name__ == "__main__":
    sys.exit(main())
