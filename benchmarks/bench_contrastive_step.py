"""Benchmark: DMT vs DMTC training-step time, i.e. the overhead of DMTC's contrastive term per step.

    python benchmarks/bench_contrastive_step.py [--backbone resnet_tiny] [--crop 96] [--labeled 2]
        [--unlabeled 6] [--classes 10] [--stages mutual,warmup] [--settings dmt,batch,bank]
        [--bank-size 256] [--rounds 30] [--warmup-steps 3] [--threads T] [--device cpu|cuda]
        [--precision 32-true] [--breakdown] [-- HYDRA_OVERRIDE ...]
    python benchmarks/bench_contrastive_step.py --backbone resnet18 --crop 161 --stages mutual --rounds 8

Defaults: the synthetic dataset's model and crop (resnet_tiny, 96×96; about a minute on 2 CPU cores);
resnet18 at 161×161 costs 4–8 s per pair step there (one thread, loaded machine).

What is timed: one full training step of the real :class:`dmtc.dmt.mutual.MutualTrainingModule` run by a real
``lightning.Trainer`` (automatic optimisation: forward of models A and B, the losses, ``self.log`` calls,
one backward of the summed loss, the SGD step and the per-step poly scheduler step), measured from the
``on_train_batch_start`` to the ``on_train_batch_end`` callback hook (batch fetching and the host-to-device
copy are outside; with ``--device cuda`` the clock is read after ``torch.cuda.synchronize()``).

Settings, all on the same pair of models (the same seeds: the backbone and ASPP weights are identical; the
DMTC models add the projection head), the same batches and the same Lightning set-up:

* ``dmt``: ``method=dmt`` (no contrastive settings, no projection head): the baseline.
* ``head``: DMTC's model with the contrastive weight 0 (projection head in the graph, no ReCo loss).
  Optional: separates the head's cost from the loss's.
* ``batch``: DMTC as configured in ``configs/method/dmtc.yaml`` (batch-only ReCo, ``bank_size: 0``).
* ``bank``: the same with the class-wise memory bank, ``--bank-size`` slots per class (README's example:
  256) filled with ``bank_per_class_per_step`` (64) features per class and step, so it is full after a
  few warm-up steps and the timed steps see a full bank.

The contrastive settings come from :func:`dmtc.settings.contrastive_settings` on the composed
``method=dmtc`` config (trailing Hydra overrides, e.g. ``method.contrastive.resolution=crop``, apply),
for phase 0 (warm-up: weight 1.0) and phase 1 (a DMT phase: weight 0.1).

Stages: ``warmup`` (a labeled batch of ``labeled + unlabeled`` images with cross-entropy, ReCo on the
ground truth) and ``mutual`` (``labeled`` + ``unlabeled`` images, dynamic mutual loss with the other
model's pseudo labels; ReCo on ground truth ++ pseudo labels gated by confidence > 0.7). Images and
labels are synthetic scenes (:func:`dmtc.data.synthetic.render_sample` at the crop size); pseudo labels
are the ground truth with 15% of the pixels switched to a random class, confidences ~ Beta(5, 1.2), and
the 30% least confident pixels ignored (as the class-balanced curriculum would at ratio 0.7).

Noise control (the machine may be shared): every setting runs its own Trainer in its own thread, but a
turnstile lets exactly one thread run at a time, and a thread keeps the turn from one step's start
until it reaches its next step (so its between-step work never overlaps another setting's timed step).
Steps are interleaved A B C, B C A, C A B, ... (order rotated every round); the first
``--warmup-steps`` rounds are not timed. Reported per setting: median, 25th–75th percentile and minimum
step time (ms); the overhead is the median over rounds of ``t_setting / t_dmt`` within the same round,
minus 1 (with its 25th–75th percentile). Prints markdown table rows (date, machine, torch, load average,
command). Target (issue 4): overhead ≤ 15%.

``--breakdown`` then times the contrastive path's parts for one model outside Lightning (same rotation):
the projection head's forward + backward, and :func:`dmtc.dmt.contrast.contrastive_term` (resizing, ReCo,
logging; with the bank also its enqueue) + backward to the features, batch-only and with a full bank;
shares are relative to the baseline pair step (×2 for the two models).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shlex
import statistics
import sys
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from machine import cpu_model  # benchmarks/machine.py (this folder is on sys.path)

from dmtc.data.synthetic import SyntheticSpec, render_sample
from dmtc.dmt.contrast import contrastive_pixels, contrastive_term
from dmtc.dmt.mutual import MutualTrainingModule, join_labeled_unlabeled
from dmtc.models import deeplab_v2
from dmtc.settings import ContrastiveSettings, contrastive_settings

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
SETTINGS = ("dmt", "head", "batch", "bank")
TURN_TIMEOUT_S = 600.0


# ------------------------------------------------------------------------------------------ inputs
def make_batches(stage: str, num: int, labeled: int, unlabeled: int, crop: tuple[int, int], classes: int,
                 seed: int) -> list[dict[str, Any]]:
    """``num`` distinct batches for ``stage`` (synthetic scenes; labels limited to ``classes``)."""
    rng = np.random.default_rng(seed)
    spec = SyntheticSpec(image_size=max(crop))
    g = torch.Generator().manual_seed(seed)

    def scene() -> tuple[torch.Tensor, torch.Tensor]:
        image, label = render_sample(rng, spec)
        image_t = torch.from_numpy(image[: crop[0], : crop[1]]).permute(2, 0, 1).float() / 255.0
        label_t = torch.from_numpy(label[: crop[0], : crop[1]].astype(np.int64))
        label_t = torch.where(label_t == 255, label_t, label_t % classes)
        return (image_t - MEAN) / STD, label_t

    def pseudo(label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = torch.where(torch.rand(label.shape, generator=g) < 0.15,
                            torch.randint(0, classes, label.shape, generator=g), label.clamp_max(classes - 1))
        beta = torch.distributions.Beta(torch.tensor(5.0), torch.tensor(1.2))
        conf = beta.sample(label.shape).clamp(0.0, 1.0)
        keep = conf >= torch.quantile(conf.flatten(), 0.3)
        return torch.where(keep, noisy, 255), conf

    batches = []
    for _ in range(num):
        if stage == "warmup":
            images, labels = zip(*(scene() for _ in range(labeled + unlabeled)))
            batches.append({"image": torch.stack(images), "label": torch.stack(labels)})
            continue
        lab_images, lab_labels = zip(*(scene() for _ in range(labeled)))
        unl_images, unl_labels = zip(*(scene() for _ in range(unlabeled)))
        unl: dict[str, torch.Tensor] = {"image": torch.stack(unl_images)}
        for key in "ab":
            maps = [pseudo(lbl) for lbl in unl_labels]
            unl[f"label_{key}"] = torch.stack([m[0] for m in maps])
            unl[f"conf_{key}"] = torch.stack([m[1] for m in maps])
        batches.append({"labeled": {"image": torch.stack(lab_images), "label": torch.stack(lab_labels)},
                        "unlabeled": unl})
    return batches


class Batches(torch.utils.data.Dataset):
    """Prebuilt batches, cycled (use with ``batch_size=None``)."""

    def __init__(self, batches: list[dict[str, Any]], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batches[index % len(self.batches)]


def dmtc_settings(overrides: list[str], backbone: str
                  ) -> tuple[dict[str, ContrastiveSettings | None], tuple[int, int], list[int]]:
    """DMTC's contrastive settings per stage from the composed ``method=dmtc backbone=<backbone>`` config,
    the projection head's (width, hidden width) and the ASPP dilations."""
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["method=dmtc", f"backbone={backbone}", *overrides])
    per_stage = {"warmup": contrastive_settings(cfg, warmup=True),
                 "mutual": contrastive_settings(cfg, warmup=False)}
    head = (int(cfg.model.projection_dim), int(cfg.model.projection_hidden))
    return per_stage, head, [int(d) for d in cfg.model.aspp_dilations]


# ------------------------------------------------------------------------------------------ timing
class Turnstile:
    """Lets the threads run one at a time, in ``schedule`` order (a list of setting indices)."""

    def __init__(self, schedule: list[int]) -> None:
        self.schedule, self.pos = schedule, 0
        self.cond = threading.Condition()
        self.error: BaseException | None = None

    def _wait(self, ready) -> None:  # noqa: ANN001
        with self.cond:
            if not self.cond.wait_for(lambda: self.error is not None or ready(), timeout=TURN_TIMEOUT_S):
                raise TimeoutError("turnstile: no progress")
            if self.error is not None:
                raise RuntimeError("another setting failed") from self.error

    def wait_turn(self, who: int) -> None:
        self._wait(lambda: self.pos < len(self.schedule) and self.schedule[self.pos] == who)

    def wait_all_done(self) -> None:
        self._wait(lambda: self.pos >= len(self.schedule))

    def pass_turn(self) -> None:
        with self.cond:
            self.pos += 1
            self.cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.cond:
            self.error = error
            self.cond.notify_all()


class StepTimer(L.Callback):
    """Times each training batch (hook to hook) while holding the turnstile's turn."""

    def __init__(self, who: int, turnstile: Turnstile, cuda: bool) -> None:
        self.who, self.turnstile, self.cuda = who, turnstile, cuda
        self.holding, self.start = False, 0.0
        self.times: list[float] = []

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001, D102
        if self.holding:  # this thread's between-step work is done: hand over
            self.holding = False
            self.turnstile.pass_turn()
        self.turnstile.wait_turn(self.who)
        self.holding = True
        self._sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001, D102
        self._sync()
        self.times.append(time.perf_counter() - self.start)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001, D102
        if self.holding:
            self.holding = False
            self.turnstile.pass_turn()
        self.turnstile.wait_all_done()  # teardown only after every timed step


def build_module(setting: str, stage: str, args: argparse.Namespace, per_stage: dict[str, Any],
                 dim: tuple[int, int], dilations: list[int]) -> MutualTrainingModule:
    contrastive = None
    if setting != "dmt":
        contrastive = per_stage[stage]
        if contrastive is None:
            raise SystemExit("method=dmtc gave no contrastive settings")
        if setting == "head":
            contrastive = replace(contrastive, weight=0.0)
        elif setting == "batch":
            contrastive = replace(contrastive, bank_size=0)
        elif setting == "bank":
            contrastive = replace(contrastive, bank_size=args.bank_size)
    models = {}
    for i, key in enumerate("ab"):
        torch.manual_seed(args.seed + i)  # the same backbone/ASPP init in every setting
        models[key] = deeplab_v2(args.classes, backbone=args.backbone, aspp_dilations=dilations,
                                 projection_dim=None if contrastive is None else dim[0], projection_hidden=dim[1])
    return MutualTrainingModule(models, stage=stage, contrastive=contrastive, num_classes=args.classes,
                                class_names=[f"c{i}" for i in range(args.classes)], lr=0.01)


def run_stage(stage: str, settings: list[str], args: argparse.Namespace, per_stage: dict[str, Any],
              dim: tuple[int, int], dilations: list[int]) -> dict[str, list[float]]:
    """Per-step times (s) of every setting for ``stage``, timed steps only, aligned by round."""
    steps = args.warmup_steps + args.rounds
    batches = make_batches(stage, min(steps, 8), args.labeled, args.unlabeled, args.crop, args.classes,
                           args.seed)
    n = len(settings)
    schedule = [(r + i) % n for r in range(steps) for i in range(n)]  # ABC, BCA, CAB, ...
    turnstile = Turnstile(schedule)
    cuda = args.device == "cuda"
    timers = [StepTimer(i, turnstile, cuda) for i in range(n)]

    def work(i: int) -> None:
        try:
            torch.set_num_threads(args.threads)  # per thread (OpenMP settings are thread-local)
            module = build_module(settings[i], stage, args, per_stage, dim, dilations)
            loader = torch.utils.data.DataLoader(Batches(batches, steps), batch_size=None, shuffle=False)
            trainer = L.Trainer(
                accelerator="gpu" if cuda else "cpu", devices=1, precision=args.precision, max_steps=steps,
                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                callbacks=[timers[i]],
            )
            trainer.fit(module, train_dataloaders=loader)
        except BaseException as error:  # noqa: BLE001 -- unblock the other threads, re-raised below
            turnstile.fail(error)
            raise

    threads = [threading.Thread(target=work, args=(i,), name=settings[i]) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if turnstile.error is not None:
        raise RuntimeError(f"{stage}: a setting failed") from turnstile.error
    return {s: timer.times[args.warmup_steps:] for s, timer in zip(settings, timers)}


def contrastive_inputs(stage: str, batch: dict[str, Any], module: MutualTrainingModule
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, labels and the contrastive ``valid`` mask of model A, built as ``training_step`` does."""
    if stage == "warmup":
        return batch["image"], batch["label"], contrastive_pixels(batch["label"], module.contrastive)
    lab, unl = batch["labeled"], batch["unlabeled"]
    images, is_pseudo = join_labeled_unlabeled(lab["image"], unl["image"])
    labels = torch.cat([lab["label"], unl["label_b"]])
    confidence = torch.cat([torch.ones_like(lab["label"], dtype=torch.float32), unl["conf_b"].float()])
    valid = contrastive_pixels(labels, module.contrastive, is_pseudo=is_pseudo, confidence=confidence)
    return images, labels, valid


def run_breakdown(stage: str, args: argparse.Namespace, per_stage: dict[str, Any], dim: tuple[int, int],
                  dilations: list[int]) -> dict[str, list[float]]:
    """Per-call times (s) of the contrastive path's parts for one model (A) on one batch of ``stage``:
    the projection head's forward + backward (on fixed backbone features, their gradient included), and
    :func:`dmtc.dmt.contrast.contrastive_term` + backward to the features without and with the memory bank
    (the bank setting's call includes its enqueue; the bank is filled by the warm-up calls). Interleaved
    and rotated like the step timing; no Lightning, CPU/GPU synchronised around each call."""
    from dmtc.module import upsample_to

    modules = {s: build_module(s, stage, args, per_stage, dim, dilations) for s in ("batch", "bank")}
    batch = make_batches(stage, 1, args.labeled, args.unlabeled, args.crop, args.classes, args.seed)[0]
    device = torch.device(args.device)
    for m in modules.values():
        m.to(device).train()
    batch = L.pytorch.utilities.move_data_to_device(batch, device)
    images, labels, valid = contrastive_inputs(stage, batch, modules["bank"])
    model = modules["bank"].models["a"]
    with torch.no_grad():
        backbone = model.backbone(images)
        logits = model.classifier(backbone)
        features = model.projection(backbone)
    backbone.requires_grad_(True)  # the head's backward also computes its input's gradient, as in a step
    logits_up = upsample_to(model, logits, labels.shape[-2:])
    leaf = features.detach().requires_grad_(True)

    def head() -> None:
        model.zero_grad(set_to_none=True)
        backbone.grad = None
        model.projection(backbone).sum().backward()

    def reco(setting: str) -> None:
        leaf.grad = None
        out = {"logits": logits, "features": leaf}
        module = modules[setting]
        bank = module.banks["a"] if "a" in module.banks else None
        contrastive_term(module.contrastive, model, out, logits_up, labels, valid, bank)[0].backward()

    parts = {"projection head fwd+bwd": head, "contrastive_term fwd+bwd, batch": lambda: reco("batch"),
             "contrastive_term fwd+bwd, bank (incl. enqueue)": lambda: reco("bank")}
    names = list(parts)
    times: dict[str, list[float]] = {k: [] for k in names}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for r in range(args.warmup_steps + args.rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            sync()
            start = time.perf_counter()
            parts[name]()
            sync()
            if r >= args.warmup_steps:
                times[name].append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------------------------------ report
def machine(device: str) -> str:
    text = f"{os.cpu_count()} CPU ({cpu_model()})"
    if device == "cuda":
        text += f", {torch.cuda.get_device_name()}"
    return text


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = np.percentile(np.asarray(values), [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet_tiny")
    parser.add_argument("--crop", type=int, nargs="+", default=[96], help="H [W] of the training crop")
    parser.add_argument("--labeled", type=int, default=2, help="labeled images per mutual batch")
    parser.add_argument("--unlabeled", type=int, default=6, help="pseudo-labeled images per mutual batch "
                        "(warm-up batches hold labeled + unlabeled labeled images)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--stages", default="mutual,warmup")
    parser.add_argument("--settings", default="dmt,batch,bank", help=f"comma-separated, from {SETTINGS}; "
                        "the first is the baseline of the ratios")
    parser.add_argument("--bank-size", type=int, default=256, help="slots per class for the 'bank' setting")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (one step per setting each)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", default="32-true", help="Lightning precision (e.g. bf16-mixed on GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--breakdown", action="store_true", help="also time the contrastive path's parts "
                        "(projection head, contrastive_term without/with bank) for one model, per stage")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the method=dmtc config (after --)")
    args = parser.parse_args()
    if len(args.crop) == 1:
        args.crop = [args.crop[0], args.crop[0]]
    args.crop = tuple(args.crop[:2])
    settings = args.settings.split(",")
    if any(s not in SETTINGS for s in settings) or len(set(settings)) != len(settings) or len(settings) < 2:
        parser.error(f"--settings: two or more distinct names from {SETTINGS}")
    if any(s not in ("mutual", "warmup") for s in args.stages.split(",")):
        parser.error("--stages: mutual and/or warmup")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    warnings.filterwarnings("ignore", ".*self.log.*not registered.*")  # --breakdown calls without a Trainer
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    settings = args.settings.split(",")
    per_stage, dim, dilations = dmtc_settings(args.overrides, args.backbone)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    results = {stage: run_stage(stage, settings, args, per_stage, dim, dilations)
               for stage in args.stages.split(",")}
    parts = {stage: run_breakdown(stage, args, per_stage, dim, dilations)
             for stage in args.stages.split(",")} if args.breakdown else {}
    wall = time.perf_counter() - started
    load_end = os.getloadavg()[0]

    date = datetime.date.today().isoformat()
    command = "python benchmarks/bench_contrastive_step.py " + shlex.join(sys.argv[1:])
    threads = args.threads
    base = settings[0]
    print(f"<!-- {date} · {machine(args.device)} · device {args.device} · torch {torch.__version__} · "
          f"lightning {L.__version__} · {threads} threads · load avg {load_start:.1f} at start, "
          f"{load_end:.1f} at end · {wall:.0f} s · `{command.strip()}` -->")
    c = per_stage["mutual"] or per_stage["warmup"]
    print(f"{args.backbone}, crop {args.crop[0]}×{args.crop[1]}, {args.classes} classes, mutual batch "
          f"{args.labeled}+{args.unlabeled}, warm-up batch {args.labeled + args.unlabeled}, precision "
          f"{args.precision}; ReCo {c.num_queries} queries × {c.num_negatives} negatives, dim {dim}, "
          f"resolution {c.resolution}, shared negatives {c.shared_negatives}; bank {args.bank_size}/class "
          f"({c.bank_per_class_per_step} per class per step); {args.rounds} timed rounds after "
          f"{args.warmup_steps}, order rotated every round")
    print()
    print(f"| stage | setting | median ms | p25–p75 ms | min ms | overhead vs {base} (median of per-round "
          "ratios) | p25–p75 of ratios |")
    print("|---|---|---|---|---|---|---|")
    for stage, times in results.items():
        for s in settings:
            lo, med, hi = quartiles(times[s])
            row = f"| {stage} | {s} | {1000 * med:.1f} | {1000 * lo:.1f}–{1000 * hi:.1f} | {1000 * min(times[s]):.1f} |"
            if s == base:
                row += " – | – |"
            else:
                ratios = [t / b for t, b in zip(times[s], times[base])]
                rlo, rmed, rhi = quartiles(ratios)
                row += f" **{100 * (rmed - 1):+.1f}%** | {100 * (rlo - 1):+.1f}% … {100 * (rhi - 1):+.1f}% |"
            print(row)
    medians = {(st, s): statistics.median(t[s]) for st, t in results.items() for s in settings}
    print()
    print("Ratio of medians (for comparison): " + "; ".join(
        f"{st}/{s} {100 * (medians[st, s] / medians[st, base] - 1):+.1f}%"
        for st in results for s in settings if s != base))
    if parts:
        print()
        print(f"Breakdown, one model (A), one batch; share = 2 × part / median {base} pair step of the stage:")
        print()
        print("| stage | part | median ms | p25–p75 ms | share of the step (both models) |")
        print("|---|---|---|---|---|")
        for stage, times in parts.items():
            for name, values in times.items():
                lo, med, hi = quartiles(values)
                share = 2 * med / medians[stage, base]
                print(f"| {stage} | {name} | {1000 * med:.1f} | {1000 * lo:.1f}–{1000 * hi:.1f} | "
                      f"{100 * share:.1f}% |")


if __name__ == "__main__":
    main()
