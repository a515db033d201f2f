"""The DMT protocol end to end (Feng et al., "DMT: Dynamic Mutual Training for Semi-Supervised
Learning", Pattern Recognition 2022, §3 and Algorithm 1).

``run_dmt(cfg)`` (``python train.py method=dmt``, or ``method=dmtc``: the same protocol with DMTC's
contrastive term, see :func:`contrastive_settings`):

1. **Warm-up (phase 0):** models A and B, made different as ``method.pair_init`` says (DMT §4.1, §4.3;
   :func:`pair_spec`), learn the labeled split with cross-entropy, side by side (the dataset's supervised
   schedule): ``seeds`` and ``inits`` on the same batches, ``subsets`` each on its own difference-maximized
   subset (A ``-l``, B ``-r``; per-model batches).
2. **Phases k = 1..K** with label ratios r_k (``method.ratios``, default 0.2 … 1.0): each model of phase
   k-1 labels the unlabeled split once (a store of argmax labels + confidences and a per-class confidence
   histogram); thresholds keeping the top r_k of each class's pixels come from the histogram and are
   applied at load time; A is trained on the labeled batches + **B's** pseudo labels and B on **A's**
   with the dynamic mutual loss (γ1, γ2), both from their phase k-1 best weights with a fresh SGD + poly
   schedule (``method.phase``, from the dataset's ``dataset.schedule.dmt_phase``). The labeled batches
   come from the run's whole labeled split in every mode, ``subsets`` included (DMT's VOC 1/106 script
   trains its phases with ``--train-set=106``, not the ``-l``/``-r`` lists).

Each model sees inputs normalised for its own initialisation everywhere (warm-up, labeling, phases,
validation): when the two inits need different pipelines (COCO/Caffe BGR 0–255 vs ImageNet), the batches
carry one normalised block per model (:class:`dmtc.builders.StackedModelInput`) and each model reads its
own; labeling uses each model's own transform. Checkpoints hold plain models: evaluate one with
``backbone.init`` set to its init (results.json lists them under ``pair.inits``).

Every phase lives in a sub-folder of the run dir (``phase0_warmup/``, ``phase1_r0.2/``, …) holding
``checkpoints/`` (best-by-val checkpoint per model, ``last.ckpt``), ``pseudo_a/``, ``pseudo_b/`` and
``done.json``, written atomically once the phase is finished and validated (the phase's ``last.ckpt`` is then
deleted unless ``method.keep_last=true``: a finished phase is never resumed; best checkpoints hold weights
only). Rerunning the same command
skips finished phases, reuses complete pseudo-label stores (manifest written last) and resumes an
unfinished phase from Lightning's ``last.ckpt``. One set of logger instances serves all phases, on one
continuous step axis.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, open_dict
from torch import nn

from dmtc.builders import (
    INITS,
    Split,
    build_datamodule,
    build_layout,
    build_loggers,
    build_model,
    build_trainer,
    configured_weights,
    input_normalization,
    resize_options,
    resolve_split,
    run_record,
    stacks_inputs,
)
from dmtc.callbacks import last_checkpoint_callback
from dmtc.data.pseudo import PseudoLabeledDataset, build_pair_phase_loader, build_phase_loader
from dmtc.data.splits import DMS_SPLITS, parse_split
from dmtc.data.transforms import build_eval_transform
from dmtc.errors import DMTCError
from dmtc.labeling import label_images, pseudo_label_summary
from dmtc.models import load_dmt_checkpoint
from dmtc.module import ENSEMBLE, ContrastiveSettings, MutualTrainingModule
from dmtc.results import write_json

log = logging.getLogger(__name__)

PAIR = ("a", "b")
DONE = "done.json"


@dataclass(frozen=True)
class Phase:
    """One step of the protocol: index (0 = warm-up), label ratio (None for warm-up), folder name."""

    index: int
    ratio: float | None

    @property
    def name(self) -> str:
        return "phase0_warmup" if self.ratio is None else f"phase{self.index}_r{self.ratio:g}"


def phases_of(cfg: DictConfig) -> list[Phase]:
    """Warm-up then one phase per ratio of ``method.ratios`` (each in (0, 1])."""
    ratios = [float(r) for r in cfg.method.ratios]
    bad = [r for r in ratios if not 0.0 < r <= 1.0]
    if bad:
        raise DMTCError(f"method.ratios must lie in (0, 1]; got {bad}")
    return [Phase(0, None)] + [Phase(i + 1, r) for i, r in enumerate(ratios)]


PAIR_INITS = ("seeds", "inits", "subsets")


@dataclass(frozen=True)
class PairSpec:
    """How DMT's models A and B differ (Feng et al., Pattern Recognition 2022, §4.1 and §4.3).

    ``mode`` (``method.pair_init``): ``seeds`` (one init, two seeds), ``inits`` (two init sources, e.g. A
    from COCO-pretrained DeepLab-v2, B from ImageNet: DMT Cityscapes and VOC 1/20) or ``subsets`` (both
    warmed up on two difference-maximized labeled subsets, ``-l``/``-r``: DMT VOC 1/106).
    ``seeds``/``inits``: per model; ``warmup``: per model the split name of its warm-up list (subsets
    only; None: both warm up on the run's split).
    """

    mode: str
    seeds: dict[str, int]
    inits: dict[str, str]
    warmup: dict[str, str] | None = None


def pair_spec(cfg: DictConfig) -> PairSpec:
    """The pair of ``method.pair_init``, ``method.seeds`` and ``method.models.<k>.{init,labeled}`` (their
    defaults come from ``dataset.schedule``); checks them without touching any file.

    ``seeds``: both models from ``backbone.init``. ``inits``: model k from ``method.models.<k>.init`` (null =
    ``backbone.init``); the two must differ. ``subsets``: model k from ``method.models.<k>.init`` too, warmed
    up on ``method.models.<k>.labeled`` (null = ``<split>-l`` for A, ``<split>-r`` for B).
    """
    m = cfg.method
    mode = str(m.get("pair_init") or "seeds")
    if mode not in PAIR_INITS:
        raise DMTCError(f"method.pair_init={mode!r}: choose seeds (two seeds), inits (two init sources, e.g. "
                        "COCO and ImageNet) or subsets (two difference-maximized labeled subsets)")
    seeds = [int(v) for v in m.seeds]
    if len(seeds) != 2:
        raise DMTCError(f"method.seeds={seeds}: give two seeds, one for A and one for B")
    if mode == "seeds" and seeds[0] == seeds[1]:
        raise DMTCError(f"method.seeds={seeds}: pair_init=seeds needs two different seeds for A and B")
    own = str(cfg.backbone.get("init", "none"))
    models = m.get("models") or {}
    inits = {}
    for key in PAIR:
        init = (models.get(key) or {}).get("init") if mode != "seeds" else None
        init = own if init is None else str(init)
        if init not in INITS:
            raise DMTCError(f"method.models.{key}.init={init!r} (model {key.upper()}, pair_init={mode}) is not an "
                            f"initialisation: use one of {', '.join(INITS)}, or null for backbone.init ({own})")
        inits[key] = init
    if cfg.get("smoke") and any(not _init_available(cfg, inits[k]) for k in PAIR):
        # debug=smoke shrinks the backbone; the dataset's pair (e.g. city's COCO A + ImageNet B) needs weight
        # files of the full ResNet-101: the smoke pair becomes two seeds of the backbone's own init
        own_ok = _init_available(cfg, own)
        fallback = own if own_ok else "none"
        log.info("debug=smoke: the pair's inits (A %s, B %s) need weight files backbone=%s lacks; the smoke run "
                 "uses pair_init=%s with init %s for both", inits["a"], inits["b"], cfg.backbone.name,
                 "subsets" if mode == "subsets" else "seeds", fallback)
        inits = {k: fallback for k in PAIR}
        if mode == "inits":
            mode = "seeds"
    if mode == "inits" and inits["a"] == inits["b"]:
        raise DMTCError(f"pair_init=inits needs two different inits, but A and B both use {inits['a']}: set "
                        "method.models.a.init / method.models.b.init (e.g. coco and imagenet), or use "
                        "method.pair_init=seeds for one init under two seeds")
    warmup = None
    if mode == "subsets":
        base, side = parse_split(cfg.split)
        warmup = {}
        for key, default_side in zip(PAIR, ("l", "r")):
            name = (models.get(key) or {}).get("labeled")
            if name is None:
                if side is not None or base not in DMS_SPLITS:
                    raise DMTCError(
                        f"pair_init=subsets warms A and B up on split={cfg.split}'s difference-maximized subsets, "
                        f"which exist for splits {list(DMS_SPLITS)} only: run one of those splits, set "
                        "method.models.a.labeled / b.labeled to your own lists' split names, or use "
                        "method.pair_init=inits or seeds"
                    )
                name = f"{base}-{default_side}"
            warmup[key] = str(name)
        if warmup["a"] == warmup["b"]:
            raise DMTCError(f"pair_init=subsets needs two different warm-up lists, but method.models.a.labeled and "
                            f"b.labeled are both {warmup['a']} (DMT: {base}-l and {base}-r)")
    return PairSpec(mode, dict(zip(PAIR, seeds)), inits, warmup)


def _init_available(cfg: DictConfig, init: str) -> bool:
    """Whether initialisation ``init`` can build the configured backbone: ``none`` always, ``coco`` and
    ``imagenet`` when the backbone config names a weight file for it (resnet_tiny names none)."""
    return init == "none" or configured_weights(cfg, init) is not None


def build_pair(cfg: DictConfig, spec: PairSpec | None = None) -> dict[str, nn.Module]:
    """Models A and B of ``spec`` (default :func:`pair_spec`): model k built from its init under
    ``torch.manual_seed(seed + method.seeds[k])``. A missing or unusable weight file is one DMTCError
    naming the model's key and the file."""
    spec = spec or pair_spec(cfg)
    models = {}
    for key in PAIR:
        torch.manual_seed(int(cfg.seed) + spec.seeds[key])
        if spec.mode == "seeds":
            models[key] = build_model(cfg)
            continue
        try:
            models[key] = build_model(cfg, init=spec.inits[key])
        except DMTCError as err:
            raise DMTCError(f"model {key.upper()} of the pair (pair_init={spec.mode}, "
                            f"method.models.{key}.init={spec.inits[key]}): {err}") from err
    return models


def warmup_lists(cfg: DictConfig, spec: PairSpec, split: Split) -> dict[str, list[str]] | None:
    """Per model the labeled names of its warm-up (``pair_init=subsets``; None otherwise): the lists of
    split ``spec.warmup[k]`` (DMT's ``-l``/``-r`` files when supplied, else made by difference-maximized
    sampling, :func:`dmtc.builders.resolve_split`), each a subset of the run's labeled split."""
    if not spec.warmup:
        return None
    layout = build_layout(cfg)
    lists = {}
    for key, name in spec.warmup.items():
        sub = copy.deepcopy(cfg)
        with open_dict(sub):
            sub.split = name
        what = f"the warm-up list of model {key.upper()} (pair_init=subsets, method.models.{key}.labeled={name})"
        try:
            names = resolve_split(sub, layout).labeled
        except DMTCError as err:
            raise DMTCError(f"cannot get {what}: {err}") from err
        if not names:
            raise DMTCError(f"{what} is empty: point method.models.{key}.labeled at a non-empty list")
        outside = sorted(set(names) - set(split.labeled))
        if outside:
            raise DMTCError(
                f"{what} holds {len(outside)} image(s) outside the run's labeled split (split={cfg.split} "
                f"sid={cfg.sid}), e.g. {outside[0]}: the subsets must come from the run's split, e.g. "
                f"{cfg.split}-l / {cfg.split}-r"
            )
        lists[key] = names
    return lists


STREAMS = ("independent", "shared")


def stream_mode(cfg: DictConfig) -> str:
    """``method.streams``: ``independent`` (each model its own shuffled, augmented stream of the split, in
    warm-up and phases, as the reference's two training processes) or ``shared`` (both models on the same
    batches). ``pair_init=subsets`` warms up on per-model lists in either mode."""
    mode = str(cfg.method.get("streams") or "independent")
    if mode not in STREAMS:
        raise DMTCError(f"method.streams={mode!r}: choose independent (each model its own data stream, the "
                        "reference's two processes) or shared (both models on the same batches)")
    return mode


def stream_order(names: list[str], cfg: DictConfig, key: str) -> list[str]:
    """``names`` in a fixed order of model ``key``'s own (seeded by the run's seed and the key).

    Single-process loaders reshuffle anyway; under DDP Lightning gives every loader a DistributedSampler
    with the same seed, which would deal both models the same images per step: over two differently
    ordered lists the same permutation picks different images."""
    order = list(names)
    random.Random(f"{int(cfg.seed)}/{key}").shuffle(order)
    return order


def _rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 and (
        not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    )


def _read_done(run_dir: Path, phase: Phase) -> dict[str, Any] | None:
    """The phase's done record if it is complete and consistent (its checkpoints exist), else None."""
    path = run_dir / phase.name / DONE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        ok = (record["phase"] == phase.index and record["ratio"] == phase.ratio
              and all((run_dir / record["checkpoints"][k]).is_file() for k in PAIR))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        log.warning("ignoring inconsistent %s: the phase will be (re)run", path)
        return None
    return record


def _checkpoint_callbacks(phase_dir: Path) -> dict[str, ModelCheckpoint]:
    """Best-by-val checkpoint per model (monitor ``val/<key>/miou``) and ``"last"`` (every validation)."""
    callbacks = {
        key: ModelCheckpoint(
            dirpath=phase_dir / "checkpoints",
            filename=f"best-{key}-step{{step}}-miou{{val/{key}/miou:.2f}}",
            auto_insert_metric_name=False,
            monitor=f"val/{key}/miou",
            mode="max",
            save_top_k=1,
            save_weights_only=True,  # read by evaluation and the next phase; resuming uses last.ckpt
        )
        for key in PAIR
    }
    callbacks["last"] = last_checkpoint_callback(phase_dir / "checkpoints")
    return callbacks


def _optim_kwargs(cfg: DictConfig, lr: float) -> dict[str, Any]:
    return {
        "num_classes": int(cfg.dataset.num_classes),
        "class_names": list(cfg.dataset.class_names),
        "lr": float(lr),
        "momentum": cfg.optim.momentum,
        "weight_decay": cfg.optim.weight_decay,
        "poly_power": cfg.optim.poly_power,
        "head_lr_mult": cfg.optim.head_lr_mult,
        "run_record": run_record(cfg),
    }


def contrastive_settings(cfg: DictConfig, phase: Phase) -> ContrastiveSettings | None:
    """DMTC's contrastive term for ``phase`` from ``method.contrastive`` (None for ``method=dmt``): weight
    ``weight_warmup`` in phase 0, ``weight_phase`` in DMT phases (DMTC: 1.0 / 0.1)."""
    c = cfg.method.get("contrastive")
    if c is None:
        return None
    try:
        return ContrastiveSettings(
            weight=float(c.weight_warmup if phase.ratio is None else c.weight_phase),
            strong_threshold=float(c.strong_threshold), weak_threshold=float(c.weak_threshold),
            temperature=float(c.temperature), num_queries=int(c.num_queries), num_negatives=int(c.num_negatives),
            shared_negatives=bool(c.get("shared_negatives", True)), resolution=str(c.resolution),
            bank_size=int(c.bank_size), bank_per_class_per_step=int(c.bank_per_class_per_step),
            bank_prototypes=bool(c.bank_prototypes), raw_prototypes=bool(c.get("raw_prototypes", False)),
        )
    except ValueError as err:
        raise DMTCError(f"method.contrastive: {err}") from err


def _rel(path: str | Path, root: Path) -> str:
    return os.path.relpath(Path(path).resolve(), root.resolve())


class _Context:
    """What every phase needs: config, run dir, data, the pair, loggers."""

    def __init__(self, cfg: DictConfig, pair: PairSpec) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.paths.output_dir)
        self.pair = pair
        #: each model's input pipeline (its init's); batches stack one block per model when they differ
        self.norms = {k: input_normalization(cfg, init=pair.inits[k]) for k in PAIR}
        self.stacked = stacks_inputs([self.norms[k] for k in PAIR])
        self.streams = stream_mode(cfg)
        self.datamodule, self.split = build_datamodule(cfg, input_norms=self.norms)
        if not self.split.unlabeled:
            raise DMTCError(f"split={cfg.split} labels every training image: DMT needs unlabeled images "
                            "(use split=8, 20, ..., add unlabeled images (dataset.unlabeled_subset; dataset=folder: "
                            "images/unlabeled/) or run method=supervised)")
        self.layout = self.datamodule.layout
        self.layout.check_files(self.split.unlabeled_subset, self.split.unlabeled, labels=False)
        self.warmup = warmup_lists(cfg, pair, self.split)
        if self.warmup is not None:  # subsets: each model its own list (warm-up only; phases use the split)
            self.datamodule.set_model_labeled(self.warmup)
        elif self.streams == "independent":  # each model its own order, crops and flips of the split
            self.datamodule.set_model_labeled({k: stream_order(self.split.labeled, cfg, k) for k in PAIR})
        self.models = build_pair(cfg, pair)
        self.loggers = build_loggers(cfg)


def _fit_phase(ctx: _Context, phase: Phase, step_offset: int, pseudo: dict[str, Any] | None,
               loaders: tuple[Any, Any] | None) -> dict[str, Any]:
    """Train (or resume) one phase, re-validate the best A and best B, write and return its record."""
    cfg, run_dir = ctx.cfg, ctx.run_dir
    phase_dir = run_dir / phase.name
    start = time.perf_counter()
    callbacks = _checkpoint_callbacks(phase_dir)
    contrastive = contrastive_settings(cfg, phase)  # a new module per phase: a fresh memory bank
    if phase.ratio is None:
        module = MutualTrainingModule(ctx.models, stage="warmup", step_offset=step_offset, contrastive=contrastive,
                                      stacked_inputs=ctx.stacked, **_optim_kwargs(cfg, cfg.optim.lr))
        overrides: dict[str, Any] = {}
    else:
        p = cfg.method.phase
        module = MutualTrainingModule(ctx.models, stage="mutual", gamma1=p.gamma1, gamma2=p.gamma2,
                                      step_offset=step_offset, contrastive=contrastive, stacked_inputs=ctx.stacked,
                                      **_optim_kwargs(cfg, p.lr))
        # validation every val_check_interval steps counted from the phase start (across epochs, as the
        # reference's global step counter), or once per epoch (null); the last step always (ValidateAtEnd)
        every = p.get("val_check_interval")
        overrides = {"max_epochs": int(p.epochs), "max_steps": int(p.max_steps), "num_sanity_val_steps": 0,
                     "val_check_interval": every, "check_val_every_n_epoch": None if every else 1}
    trainer = build_trainer(cfg, loggers=ctx.loggers, exclude_callbacks=("model_checkpoint", "last_checkpoint"),
                            extra_callbacks=list(callbacks.values()), default_root_dir=str(phase_dir), **overrides)
    last = phase_dir / "checkpoints" / "last.ckpt"
    resume = str(last) if last.is_file() else None
    if resume:
        log.info("%s: resuming from %s", phase.name, resume)
    if phase.ratio is None:
        trainer.fit(module, datamodule=ctx.datamodule, ckpt_path=resume)
    else:
        train_loader = loaders[0](trainer.world_size) if loaders else None
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=ctx.datamodule.val_dataloader(),
                    ckpt_path=resume)

    best: dict[str, str] = {}
    for key in PAIR:
        path = callbacks[key].best_model_path or callbacks["last"].best_model_path
        if not path or not Path(path).is_file():
            raise DMTCError(f"{phase.name}: no checkpoint of model {key} was written; validation must run at "
                            "least once per phase (check trainer.limit_val_batches / val_check_interval)")
        best[key] = path
        load_dmt_checkpoint(ctx.models[key], path, model_key=key, allow_head_mismatch=False)
    trainer.validate(module, dataloaders=ctx.datamodule.val_dataloader(), verbose=False)
    val = {k: dict(module.val_summaries[k]) for k in (*PAIR, ENSEMBLE)}
    steps = int(trainer.global_step)
    record = {
        "phase": phase.index,
        "name": phase.name,
        "ratio": phase.ratio,
        "steps": steps,
        "step_start": step_offset,
        "step_end": step_offset + steps,
        "checkpoints": {k: _rel(v, run_dir) for k, v in best.items()},
        "val": val,
        "pseudo": pseudo,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    if trainer.is_global_zero:
        write_json(phase_dir / DONE, record)
        if not cfg.method.get("keep_last", False):
            # a finished phase is never resumed: its last.ckpt (weights + optimizer of both models) goes
            (phase_dir / "checkpoints" / "last.ckpt").unlink(missing_ok=True)
        log.info("%s done: mIoU A %.2f, B %.2f, ensemble %.2f", phase.name, val["a"]["miou"], val["b"]["miou"],
                 val[ENSEMBLE]["miou"])
    return record


def _label_phase(ctx: _Context, phase: Phase, prev: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Label the unlabeled split with both phase k-1 models; thresholds for r_k; the phase's loader."""
    cfg, run_dir, ds = ctx.cfg, ctx.run_dir, ctx.cfg.dataset
    phase_dir = run_dir / phase.name
    base_size = list(ds.base_size) if ds.get("base_size") else None
    stores, thresholds, summaries = {}, {}, {}
    start = time.perf_counter()
    for key in PAIR:
        # evaluation normalisation of the model's own init, at the training base size (labels are made
        # where training crops); = dmtc.labeling.labeling_transform for the config's own init
        transform = build_eval_transform(base_size=base_size, **resize_options(cfg), **ctx.norms[key])
        store, hist, reused = label_images(
            ctx.models[key], ctx.layout, ctx.split.unlabeled_subset, ctx.split.unlabeled, phase_dir / f"pseudo_{key}",
            meta={"model": key, "source": prev["checkpoints"][key], "phase": phase.index},
            num_classes=int(ds.num_classes), transform=transform, batch_size=int(ds.val_batch_size),
            num_workers=int(ds.num_workers),
        )
        stores[key], thresholds[key] = store, hist.thresholds(float(phase.ratio))
        quality = bool(cfg.method.get("pseudo_quality", True))
        summaries[key] = pseudo_label_summary(
            store, hist, thresholds[key], list(ds.class_names), float(phase.ratio),
            layout=ctx.layout if quality else None, subset=ctx.split.unlabeled_subset,
        )
        summaries[key]["reused"] = reused
    log.info("%s: pseudo labels ready in %.1fs (kept A %.1f%%, B %.1f%% of pixels)", phase.name,
             time.perf_counter() - start, 100 * summaries["a"]["kept_fraction"], 100 * summaries["b"]["kept_fraction"])

    p = cfg.method.phase
    sizes = {"labeled_batch_size": int(p.labeled_batch_size), "unlabeled_batch_size": int(p.unlabeled_batch_size),
             "num_workers": int(ds.num_workers)}
    if ctx.streams == "shared":
        # the warm-up's training transform (one normalised block per model when their inits differ)
        unlabeled = PseudoLabeledDataset(ctx.layout, ctx.split.unlabeled_subset, ctx.split.unlabeled, stores,
                                         thresholds, ctx.datamodule.train_transform)
        labeled = ctx.datamodule.train_dataset()  # the run's whole labeled split, in every pair_init mode

        def make_loader(world_size: int) -> Any:
            return build_phase_loader(labeled, unlabeled, world_size=world_size, **sizes)

        return summaries, make_loader
    # independent: model k reads the whole labeled split and the unlabeled images with the other model's
    # labels (its targets), in its own order and augmentation, through its own input pipeline
    streams = {}
    for key, other in (("a", "b"), ("b", "a")):
        transform = ctx.datamodule.model_train_transforms[key]
        labeled_k = ctx.datamodule.train_dataset(stream_order(ctx.split.labeled, cfg, key), key)
        unlabeled_k = PseudoLabeledDataset(ctx.layout, ctx.split.unlabeled_subset,
                                           stream_order(ctx.split.unlabeled, cfg, key), {other: stores[other]},
                                           {other: thresholds[other]}, transform)
        streams[key] = (labeled_k, unlabeled_k)

    def make_pair_loader(world_size: int) -> Any:
        return build_pair_phase_loader(streams, world_size=world_size, **sizes)

    return summaries, make_pair_loader


def _final_results(cfg: DictConfig, ctx: _Context, records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    run_dir = ctx.run_dir
    final = records[-1]
    key = max(PAIR, key=lambda k: final["val"][k]["miou"])
    checkpoints = {k: str((run_dir / final["checkpoints"][k]).resolve()) for k in PAIR}
    phases = []
    for rec in records:
        phases.append({
            "phase": rec["phase"], "name": rec["name"], "ratio": rec["ratio"], "steps": rec["steps"],
            "val": rec["val"], "pseudo": rec["pseudo"],
            "checkpoints": {k: str((run_dir / rec["checkpoints"][k]).resolve()) for k in PAIR},
            "wall_time_s": rec["wall_time_s"],
        })
    return {
        "task": "train",
        "method": str(cfg.method.name),
        "dataset": cfg.dataset.name,
        "split": ctx.split.name,
        "sid": int(cfg.sid),
        "seed": int(cfg.seed),
        "backbone": cfg.backbone.name,
        "pair_init": ctx.pair.mode,
        "pair": {"inits": dict(ctx.pair.inits), "seeds": dict(ctx.pair.seeds), "warmup_lists": ctx.pair.warmup,
                 "warmup_labeled": {k: len(v) for k, v in ctx.warmup.items()} if ctx.warmup else None,
                 "stacked_inputs": ctx.stacked},
        "ratios": [float(r) for r in cfg.method.ratios],
        "model": key,
        "miou": final["val"][key]["miou"],
        "per_class_iou": final["val"][key]["per_class_iou"],
        "checkpoint": checkpoints[key],
        "checkpoints": checkpoints,
        "ensemble_miou": final["val"][ENSEMBLE]["miou"],
        "warmup_miou": {k: records[0]["val"][k]["miou"] for k in (*PAIR, ENSEMBLE)},
        "phases": phases,
        "num_labeled": len(ctx.split.labeled),
        "num_unlabeled": len(ctx.split.unlabeled),
        "num_val": len(ctx.split.val),
        "steps": final["step_end"],
        "wall_time_s": round(sum(r["wall_time_s"] for r in records), 1),
        "this_run_wall_time_s": round(wall, 1),
        "output_dir": str(run_dir.resolve()),
    }


def format_dmt_table(results: dict[str, Any]) -> str:
    """Per-phase mIoU of A, B and their ensemble, then warm-up vs final."""
    head = f"{'phase':<16}{'ratio':>6}{'A':>8}{'B':>8}{'A+B':>8}"
    title = f"{results['method'].upper()} {results['dataset']} split={results['split']} sid={results['sid']}"
    lines = [f"{title}: val mIoU (%)", head, "-" * len(head)]
    for ph in results["phases"]:
        v = ph["val"]
        ratio = "-" if ph["ratio"] is None else f"{ph['ratio']:g}"
        lines.append(f"{ph['name']:<16}{ratio:>6}{v['a']['miou']:8.2f}{v['b']['miou']:8.2f}{v[ENSEMBLE]['miou']:8.2f}")
    lines.append("-" * len(head))
    w, f = results["phases"][0]["val"], results["phases"][-1]["val"]
    for label, k in (("A", "a"), ("B", "b"), ("ensemble", ENSEMBLE)):
        lines.append(f"{label:<9} warm-up {w[k]['miou']:6.2f} → final {f[k]['miou']:6.2f} "
                     f"({f[k]['miou'] - w[k]['miou']:+.2f})")
    lines.append(f"best model: {results['model'].upper()} ({results['miou']:.2f}) {results['checkpoint']}")
    return "\n".join(lines)


def run_dmt(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) the whole DMT protocol as configured; write and return ``results.json``."""
    run_dir = Path(cfg.paths.output_dir)
    results_path = run_dir / "results.json"  # a finished run is reported by dmtc.training.train
    phases = phases_of(cfg)
    for phase in phases[:2]:  # the warm-up's and the phases' settings: fail before any work
        contrastive_settings(cfg, phase)
    pair = pair_spec(cfg)
    if cfg.get("overwrite", False) and _rank_zero():
        results_path.unlink(missing_ok=True)
        for phase in phases:
            shutil.rmtree(run_dir / phase.name, ignore_errors=True)
    start = time.perf_counter()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    ctx = _Context(cfg, pair)
    log.info("DMT on %s split=%s sid=%s: %d labeled, %d unlabeled, %d val images; phases %s",
             cfg.dataset.name, ctx.split.name, cfg.sid, len(ctx.split.labeled), len(ctx.split.unlabeled),
             len(ctx.split.val), [p.name for p in phases])
    warm = {k: f"{pair.warmup[k]} ({len(ctx.warmup[k])} images)" for k in PAIR} if ctx.warmup else None
    log.info("pair_init=%s: A init %s seed %d%s, B init %s seed %d%s%s", pair.mode, pair.inits["a"], pair.seeds["a"],
             f" warm-up on {warm['a']}" if warm else "", pair.inits["b"], pair.seeds["b"],
             f" warm-up on {warm['b']}" if warm else "", "; one input block per model" if ctx.stacked else "")

    records: list[dict[str, Any]] = []
    pending: dict[str, str] | None = None  # checkpoints to load into the pair before the next phase runs
    for phase in phases:
        record = _read_done(run_dir, phase)
        if record is not None:
            log.info("%s finished earlier: skipping it (delete %s to retrain it)", phase.name,
                     run_dir / phase.name / DONE)
            records.append(record)
            pending = record["checkpoints"]
            continue
        if pending is not None:
            for key in PAIR:
                load_dmt_checkpoint(ctx.models[key], run_dir / pending[key], model_key=key, allow_head_mismatch=False)
        L.seed_everything(int(cfg.seed) + phase.index, workers=True, verbose=False)
        step_offset = records[-1]["step_end"] if records else 0
        pseudo, make_loader = (None, None) if phase.ratio is None else _label_phase(ctx, phase, records[-1])
        record = _fit_phase(ctx, phase, step_offset, pseudo, (make_loader,) if make_loader else None)
        records.append(record)
        pending = None  # the pair now holds this phase's best weights

    results = _final_results(cfg, ctx, records, time.perf_counter() - start)
    if _rank_zero():
        write_json(results_path, results)
        print(format_dmt_table(results))
        log.info("results written to %s", results_path)
    return results
