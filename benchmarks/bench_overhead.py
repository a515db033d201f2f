"""Step overhead: a dmtc training step (real Trainer, real data path) vs a bare PyTorch loop of the same math.

    python benchmarks/bench_overhead.py [--backbone resnet18] [--crop 128] [--batch 8] [--steps 20]
        [--warmup 3] [--threads T] [--profile] [-- HYDRA_OVERRIDE ...]

**dmtc side**: ``python train.py method=supervised`` as it runs (``dmtc.supervised.run_supervised``'s pieces:
``build_datamodule``, ``build_model`` + ``prepare_models``, ``build_module``, ``build_trainer`` with the
default callbacks and the CSV logger: progress line, learning-rate monitor, ValidateAtEnd, checkpoint
callbacks, ``self.log`` of the loss every step, logging every ``trainer.log_every_n_steps`` steps), on the
synthetic set (a small copy in a temp folder: 80 train images of 128², split 1), validation off
(``limit_val_batches=0``: the step is measured, not validation). Data are loaded in-process
(``dataset.num_workers=0``), so both sides pay the same decoding and augmentation.

**bare side**: the same math by hand: a copy of the same initial weights, a ``DataLoader`` over the
datamodule's own training dataset (batch, shuffle, drop_last as dmtc's), forward, bilinear upsampling of the
logits (the model's align_corners), cross-entropy with 255 ignored, ``zero_grad(set_to_none=True)``,
backward, SGD with dmtc's parameter groups, momentum and weight decay, and the poly ``LambdaLR`` step.

**Interleaving** (the machine may be shared): a callback runs one bare step inside each dmtc step's
``on_train_batch_end``; a dmtc step's time is the wall time from the end of one bare step to the start of
the next (all of Lightning's loop, fetching, hooks, logging and callbacks, once each), the bare step's its
own wall time. Both sides thus alternate step by step under the same load. Reported: the ratio of the
summed times and the median of the per-step ratios (with the 25th–75th percentile), after ``--warmup``
untimed steps. Target (issue 14): ratio ≤ 1.05 on CPU (resnet18, 128², batch 8).

``--profile`` also runs cProfile over the timed dmtc steps and prints the functions with the most own time
outside the model's math (what the framework adds).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import datetime
import os
import pstats
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from machine import cpu_model  # benchmarks/machine.py (this folder is on sys.path)
from omegaconf import open_dict
from torch.utils.data import DataLoader

import dmtc.config  # noqa: F401  (resolvers)
from dmtc.data.build import build_datamodule
from dmtc.models.deeplab import model_align_corners, upsample_logits
from dmtc.models.inits import build_model
from dmtc.module import poly_factor
from dmtc.speed import prepare_models
from dmtc.trainer import build_module, build_trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def compose_run(tmp: Path, args: argparse.Namespace, steps: int) -> Any:
    """The ``train`` config of the measured run, as ``python train.py`` composes it, writing under ``tmp``."""
    overrides = [
        "method=supervised", f"backbone={args.backbone}", "backbone.init=none", "split=1",
        f"dataset.crop_size=[{args.crop},{args.crop}]", f"dataset.batch_size={args.batch}", "dataset.num_workers=0",
        "dataset.generate.spec.num_train=80", "dataset.generate.spec.num_val=8",
        f"paths.cache_dir={tmp / 'cache'}", f"paths.log_dir={tmp / 'outputs'}",
        f"trainer.max_steps={steps}", "trainer.max_epochs=-1", "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0", "trainer.val_check_interval=100000", "trainer.check_val_every_n_epoch=null",
        *args.overrides,
    ]
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp / "run")
    HydraConfig.instance().set_config(cfg)
    return cfg


class BareLoop:
    """The same training math as dmtc's supervised step, by hand (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, dataset: Any, cfg: Any, total_steps: int) -> None:
        self.model = model.train()
        self.loader = DataLoader(dataset, batch_size=int(cfg.dataset.batch_size), shuffle=True, drop_last=True)
        self.batches = iter(self.loader)
        backbone = {id(p) for p in model.backbone.parameters()}
        groups = [{"params": [p for p in model.parameters() if id(p) in backbone]},
                  {"params": [p for p in model.parameters() if id(p) not in backbone]}]
        lr = float(cfg.optim.lr)
        self.optimizer = torch.optim.SGD(groups, lr=lr, momentum=float(cfg.optim.momentum),
                                         weight_decay=float(cfg.optim.weight_decay))
        power = float(cfg.optim.poly_power)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda step: poly_factor(step, total_steps, power))
        self.corners = model_align_corners(model)

    def step(self) -> float:
        """One step (fetch, forward, loss, backward, SGD, schedule); returns its wall time in seconds."""
        start = time.perf_counter()
        try:
            batch = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            batch = next(self.batches)
        images, labels = batch["image"], batch["label"]
        logits = upsample_logits(self.model(images)["logits"], labels.shape[-2:], align_corners=self.corners)
        loss = F.cross_entropy(logits, labels, ignore_index=255)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return time.perf_counter() - start


class Interleave(L.Callback):
    """Runs one bare step inside every dmtc step's ``on_train_batch_end`` and times both (module docstring)."""

    def __init__(self, bare: BareLoop, warmup: int, profile: bool) -> None:
        self.bare, self.warmup = bare, warmup
        self.mark: float | None = None
        self.pairs: list[tuple[float, float]] = []
        self.profiler = cProfile.Profile() if profile else None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:  # noqa: D102
        if self.mark is None:  # the first step: from its start
            self.mark = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:  # noqa: D102
        dmtc_time = time.perf_counter() - self.mark
        timed = trainer.global_step > self.warmup
        if self.profiler is not None and timed:
            self.profiler.disable()
        bare_time = self.bare.step()
        if timed:
            self.pairs.append((dmtc_time, bare_time))
        if self.profiler is not None and trainer.global_step >= self.warmup:
            self.profiler.enable()
        self.mark = time.perf_counter()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (each: one dmtc and one bare step)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed dmtc steps")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the dmtc run (after --)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="dmtc-overhead-") as tmp:
        cfg = compose_run(Path(tmp), args, steps)
        L.seed_everything(0, workers=True, verbose=False)
        datamodule, _ = build_datamodule(cfg)
        model = build_model(cfg)
        bare = BareLoop(copy.deepcopy(model), datamodule.train_dataset(), cfg, steps)
        module = build_module(cfg, prepare_models(cfg, {"a": model}))
        timer = Interleave(bare, args.warmup, args.profile)
        trainer = build_trainer(cfg, extra_callbacks=[timer], enable_model_summary=False)
        trainer.fit(module, datamodule=datamodule)
    dmtc_t = [d for d, _ in timer.pairs]
    bare_t = [b for _, b in timer.pairs]
    ratios = [d / b for d, b in timer.pairs]
    load = os.getloadavg()
    command = "python benchmarks/bench_overhead.py " + shlex.join(sys.argv[1:])
    print(f"{datetime.date.today()}, {cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), Lightning {L.__version__}, load average {load[0]:.1f}/{load[1]:.1f}; "
          f"`{command}`\n")
    print("| setting | steps | dmtc median ms | bare median ms | ratio of sums | median ratio (p25…p75) |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.backbone} {args.crop}², batch {args.batch}, supervised, CPU | {len(ratios)} | "
          f"{1000 * statistics.median(dmtc_t):.1f} | {1000 * statistics.median(bare_t):.1f} | "
          f"**{sum(dmtc_t) / sum(bare_t):.3f}** | {statistics.median(ratios):.3f} "
          f"({percentile(ratios, 0.25):.3f}…{percentile(ratios, 0.75):.3f}) |")
    if timer.profiler is not None:
        stats = pstats.Stats(timer.profiler)
        stats.sort_stats("tottime")
        print("\ncProfile of the timed dmtc steps (own time, top 25):")
        stats.print_stats(25)


if __name__ == "__main__":
    main()
