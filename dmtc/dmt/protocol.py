"""The DMT protocol end to end (Feng et al., "DMT: Dynamic Mutual Training for Semi-Supervised
Learning", Pattern Recognition 2022, §3 and Algorithm 1); ``method=dmtc`` adds DMTC's contrastive term.

:func:`run_dmt`:

1. **Warm-up (phase 0):** models A and B, made different as ``method.pair_init`` says
   (:mod:`dmtc.dmt.pair`), learn the labeled split with cross-entropy, side by side (the dataset's
   supervised schedule).
2. **Phases k = 1..K** with label ratios r_k (``method.ratios``): each model of phase k-1 labels the
   unlabeled split once (:mod:`dmtc.dmt.labeling`); thresholds keeping the top r_k of each class's pixels
   come from the histogram (:mod:`dmtc.dmt.curriculum`) and are applied at load time
   (:mod:`dmtc.dmt.phase_data`); A is trained on the labeled batches + **B's** pseudo labels and B on
   **A's** with the dynamic mutual loss (:mod:`dmtc.dmt.mutual`), both from their phase k-1 best weights
   with a fresh SGD + poly schedule (``method.phase``).

Each model sees inputs normalised for its own initialisation everywhere (warm-up, labeling, phases,
validation): when the two inits need different pipelines (COCO/Caffe BGR 0–255 vs ImageNet), the batches
carry one normalised block per model (:class:`dmtc.data.transforms.StackedModelInput`).

Rerunning the same command skips finished phases (their ``done.json``, :mod:`dmtc.dmt.phases`), reuses
complete pseudo-label stores and resumes an unfinished phase from Lightning's ``last.ckpt``. One set of
logger instances serves all phases, on one continuous step axis (:class:`dmtc.loggers.StepOffsetLogger`).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig
from torch import nn

from dmtc import interrupts
from dmtc.checkpoint_io import checkpoint_step, remove_resume_files, resume_checkpoint
from dmtc.data.build import build_datamodule, resize_options
from dmtc.data.datamodule import SegmentationDataModule
from dmtc.data.layouts import DatasetLayout
from dmtc.data.split_resolver import Split
from dmtc.data.transforms import build_eval_transform, stacks_inputs
from dmtc.dmt.labeling import label_images, pseudo_label_summary
from dmtc.dmt.mutual import MutualTrainingModule
from dmtc.dmt.pair import PAIR, PairSpec, build_pair, pair_spec, stream_mode, stream_order, warmup_lists
from dmtc.dmt.phase_data import phase_loader_factory
from dmtc.dmt.phases import (
    DONE,
    Phase,
    PhaseRecord,
    checkpoint_callbacks,
    load_phase_weights,
    phases_of,
    read_done,
    relative,
    write_done,
)
from dmtc.dmt.pseudo_panels import log_pseudo_labels
from dmtc.dmt.results import dmt_results
from dmtc.errors import DMTCError
from dmtc.files import RESULTS, is_rank_zero
from dmtc.loggers import StepOffsetLogger
from dmtc.models.inits import input_normalization
from dmtc.module import ENSEMBLE
from dmtc.progress import format_duration
from dmtc.settings import contrastive_settings, optim_settings, phase_settings
from dmtc.speed import prepare_models
from dmtc.trainer import build_loggers, build_trainer, module_kwargs

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What every phase of one DMT run needs: its config and folder, the pair, the data, the loggers."""

    cfg: DictConfig
    run_dir: Path
    pair: PairSpec
    #: each model's input pipeline (its init's); batches stack one block per model when they differ
    norms: dict[str, dict[str, Any]]
    stacked: bool
    streams: str
    datamodule: SegmentationDataModule
    split: Split
    layout: DatasetLayout
    #: per model its warm-up list (pair_init=subsets), else None
    warmup: dict[str, list[str]] | None
    models: dict[str, nn.Module]
    loggers: list[Any]


def prepare_run(cfg: DictConfig, pair: PairSpec) -> Run:
    """The run's data (checked on disk), the pair's models and the loggers, once for all phases."""
    norms = {k: input_normalization(cfg, init=pair.inits[k]) for k in PAIR}
    datamodule, split = build_datamodule(cfg, input_norms=norms)
    if not split.unlabeled:
        raise DMTCError(f"split={cfg.split} labels every training image: DMT needs unlabeled images "
                        "(use split=8, 20, ..., add unlabeled images (dataset.unlabeled_subset; dataset=folder: "
                        "images/unlabeled/) or run method=supervised)")
    layout = datamodule.layout
    layout.check_files(split.unlabeled_subset, split.unlabeled, labels=False)
    streams = stream_mode(cfg)
    warmup = warmup_lists(cfg, pair, split)
    if warmup is not None:  # subsets: each model its own list (warm-up only; phases use the split)
        datamodule.set_model_labeled(warmup)
    elif streams == "independent":  # each model its own order, crops and flips of the split
        datamodule.set_model_labeled({k: stream_order(split.labeled, cfg, k) for k in PAIR})
    return Run(cfg, Path(cfg.paths.output_dir), pair, norms, stacks_inputs([norms[k] for k in PAIR]), streams,
               datamodule, split, layout, warmup, prepare_models(cfg, build_pair(cfg, pair)), build_loggers(cfg))


def stage_module(run: Run, phase: Phase) -> MutualTrainingModule:
    """A new module per phase (a fresh optimizer, schedule and memory bank): cross-entropy in the warm-up,
    the dynamic mutual loss in phases; DMTC's term with the stage's weight."""
    cfg = run.cfg
    contrastive = contrastive_settings(cfg, warmup=phase.warmup)
    if phase.warmup:
        return MutualTrainingModule(run.models, stage="warmup", contrastive=contrastive, stacked_inputs=run.stacked,
                                    **module_kwargs(cfg, optim_settings(cfg)))
    p = phase_settings(cfg)
    return MutualTrainingModule(run.models, stage="mutual", gamma1=p.gamma1, gamma2=p.gamma2,
                                contrastive=contrastive, stacked_inputs=run.stacked,
                                **module_kwargs(cfg, optim_settings(cfg, lr=p.lr)))


def phase_batches_per_epoch(cfg: DictConfig, unlabeled_images: int) -> int:
    """Training steps of one pass over the unlabeled set: ``unlabeled_images // unlabeled_batch_size`` (the
    batch size is global, :func:`dmtc.dmt.phase_data.phase_loaders`), cut as Lightning cuts each epoch by
    ``trainer.limit_train_batches`` (an int: at most that many; a float: that fraction, rounded down)."""
    batches = unlabeled_images // phase_settings(cfg).unlabeled_batch_size
    limit = cfg.trainer.get("limit_train_batches")
    if limit is None:
        return batches
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise DMTCError(f"trainer.limit_train_batches={limit!r}: give a number of batches (int) or a fraction (float)")
    return min(batches, int(limit)) if isinstance(limit, int) else int(batches * float(limit))


def stage_schedule(cfg: DictConfig, phase: Phase, unlabeled_images: int) -> dict[str, Any]:
    """Trainer arguments of a phase: the warm-up keeps ``trainer.*`` (the dataset's supervised schedule);
    a DMT phase runs ``method.phase.epochs`` (capped at ``max_steps``) and validates every
    ``val_check_interval`` steps counted from the phase start (across epochs, as the reference's global
    step counter), or once per epoch (null); the last step always (ValidateAtEnd).

    The Trainer is given only the limit that ends the phase (``unlabeled_images``, the size of the phase's
    unlabeled split, tells which): epochs when the cap is not reached first, else the cap with endless
    epochs. Lightning (2.6) given both a finite
    ``max_epochs`` and ``max_steps`` resumes a checkpoint written by an end-of-epoch validation as if the
    whole fit had ended (the epoch is counted twice), so a phase killed after its first epoch would stop
    at that epoch's step (``test_kill_in_a_capped_phase_resumes_to_the_cap``)."""
    if phase.warmup:
        return {}
    p = phase_settings(cfg)
    epochs, cap = p.epochs, p.max_steps
    if cap != -1:
        if epochs * phase_batches_per_epoch(cfg, unlabeled_images) <= cap:
            cap = -1  # the epochs end the phase first
        else:
            epochs = -1  # the cap ends it, within some epoch
    every = p.val_check_interval
    return {"max_epochs": epochs, "max_steps": cap, "num_sanity_val_steps": 0,
            "val_check_interval": every, "check_val_every_n_epoch": None if every else 1}


def stage_label(phase: Phase, phases: int) -> str:
    """How progress output names a phase: ``warm-up (A, B)`` or ``phase 3/5 r=0.6 (A on B's, B on A's labels)``."""
    if phase.warmup:
        return "warm-up (A, B)"
    return f"phase {phase.index}/{phases - 1} r={phase.ratio:g} (A on B's, B on A's labels)"


def fit_phase(run: Run, phase: Phase, step_offset: int, pseudo: dict[str, Any] | None, phases: int,
              first_fit: bool = True) -> PhaseRecord:
    """Train (or resume) one phase, load and re-validate the best A and best B, write and return its record.
    ``phases``: how many the run has (for the progress display); ``first_fit``: whether this process has
    not trained a phase yet (Lightning's model summary is printed once)."""
    cfg, run_dir = run.cfg, run.run_dir
    phase_dir = run_dir / phase.name
    start = time.perf_counter()
    callbacks = checkpoint_callbacks(phase_dir)
    module = stage_module(run, phase)
    # one step axis over all phases; every row says its phase
    loggers = [StepOffsetLogger(lg, step_offset, {"phase": phase.index}) for lg in run.loggers]
    trainer = build_trainer(cfg, loggers=loggers, exclude_callbacks=("model_checkpoint", "last_checkpoint"),
                            extra_callbacks=list(callbacks.values()), default_root_dir=str(phase_dir),
                            stage=stage_label(phase, phases), **stage_schedule(cfg, phase, len(run.split.unlabeled)),
                            lr_key="optim.lr" if phase.warmup else "method.phase.lr",
                            **({} if first_fit else {"enable_model_summary": False}))
    checkpoints = phase_dir / "checkpoints"
    resume = resume_checkpoint(checkpoints, what=phase.name)
    if resume:
        log.info("%s: resuming from %s (step %s)", phase.name, resume, checkpoint_step(resume))
    with interrupts.deferred():
        trainer.fit(module, datamodule=run.datamodule, ckpt_path=resume)

    best: dict[str, str] = {}
    for key in PAIR:
        path = callbacks[key].best_model_path or callbacks["last"].best_model_path
        if not path or not Path(path).is_file():
            raise DMTCError(f"{phase.name}: no checkpoint of model {key} was written; validation must run at "
                            "least once per phase (check trainer.limit_val_batches / val_check_interval)")
        best[key] = path
        load_phase_weights(run.models[key], path, key)
    for logger in loggers:  # these rows re-validate the best checkpoints: not a jump in the training curve
        logger.columns["best_revalidation"] = 1
    trainer.validate(module, dataloaders=run.datamodule.val_dataloader(), verbose=False)
    steps = int(trainer.global_step)
    record = PhaseRecord(
        phase=phase.index, name=phase.name, ratio=phase.ratio, steps=steps, step_start=step_offset,
        step_end=step_offset + steps, checkpoints={k: relative(v, run_dir) for k, v in best.items()},
        val={k: dict(module.val_summaries[k]) for k in (*PAIR, ENSEMBLE)}, pseudo=pseudo,
        wall_time_s=round(time.perf_counter() - start, 1),
    )
    if trainer.is_global_zero:
        write_done(run_dir, record)
        # a finished phase is never resumed: its last.ckpt (weights + optimizer of both models) goes
        remove_resume_files(checkpoints, keep_last=bool(cfg.method.get("keep_last", False)))
        log.info("%s done: mIoU A %.2f, B %.2f, ensemble %.2f", phase.name, record.miou("a"), record.miou("b"),
                 record.miou(ENSEMBLE))
    return record


def label_phase(run: Run, phase: Phase, prev: PhaseRecord, step: int) -> dict[str, Any]:
    """Label the unlabeled split with both phase k-1 models, thresholds for r_k, and serve the phase's
    batches from the datamodule; returns each model's pseudo-label summary (on W&B at ``step``, the
    phase's first step: :func:`dmtc.dmt.pseudo_panels.log_pseudo_labels`)."""
    cfg, ds = run.cfg, run.cfg.dataset
    phase_dir = run.run_dir / phase.name
    base_size = list(ds.base_size) if ds.get("base_size") else None
    stores, thresholds, summaries = {}, {}, {}
    start = time.perf_counter()
    for key in PAIR:
        # evaluation normalisation of the model's own init, at the training base size (labels are made
        # where training crops); = dmtc.dmt.labeling.labeling_transform for the config's own init
        transform = build_eval_transform(base_size=base_size, **resize_options(cfg), **run.norms[key])
        store, hist, reused = label_images(
            run.models[key], run.layout, run.split.unlabeled_subset, run.split.unlabeled, phase_dir / f"pseudo_{key}",
            meta={"model": key, "source": prev.checkpoints[key], "phase": phase.index},
            num_classes=int(ds.num_classes), transform=transform, batch_size=int(ds.val_batch_size),
            num_workers=int(ds.num_workers), prefetch_factor=ds.get("prefetch_factor"),
        )
        stores[key], thresholds[key] = store, hist.thresholds(float(phase.ratio))
        quality = bool(cfg.method.pseudo_quality)
        summaries[key] = pseudo_label_summary(
            store, hist, thresholds[key], list(ds.class_names), float(phase.ratio),
            layout=run.layout if quality else None, subset=run.split.unlabeled_subset,
        )
        summaries[key]["reused"] = reused
    log.info("%s: pseudo labels ready in %.1fs (kept A %.1f%%, B %.1f%% of pixels)", phase.name,
             time.perf_counter() - start, 100 * summaries["a"]["kept_fraction"], 100 * summaries["b"]["kept_fraction"])
    log_pseudo_labels(run.loggers, step, summaries, stores, thresholds, run.layout, run.split.unlabeled_subset,
                      list(ds.class_names), cfg.get("media"))
    p = phase_settings(cfg)
    run.datamodule.serve_phase(phase_loader_factory(
        run.datamodule, run.layout, run.split.unlabeled_subset, run.split.unlabeled, stores, thresholds,
        streams=run.streams, order=lambda names, key: stream_order(list(names), cfg, key),
        labeled_batch_size=p.labeled_batch_size, unlabeled_batch_size=p.unlabeled_batch_size,
        num_workers=int(ds.num_workers), prefetch_factor=ds.get("prefetch_factor"),
    ))
    return summaries


def check_settings(cfg: DictConfig) -> tuple[list[Phase], PairSpec]:
    """The phases and the pair, every setting of the method checked before any work."""
    phases = phases_of(cfg)
    contrastive_settings(cfg, warmup=True)
    if len(phases) > 1:
        phase_settings(cfg)
        contrastive_settings(cfg, warmup=False)
    return phases, pair_spec(cfg)


def run_dmt(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) the whole DMT protocol as configured; return the results (``results.json``)."""
    run_dir = Path(cfg.paths.output_dir)
    phases, pair = check_settings(cfg)
    if cfg.get("overwrite", False) and is_rank_zero():
        (run_dir / RESULTS).unlink(missing_ok=True)
        for phase in phases:
            shutil.rmtree(run_dir / phase.name, ignore_errors=True)
    start = time.perf_counter()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    run = prepare_run(cfg, pair)
    log.info("DMT on %s split=%s sid=%s: %d labeled, %d unlabeled, %d val images; phases %s",
             cfg.dataset.name, run.split.name, cfg.sid, len(run.split.labeled), len(run.split.unlabeled),
             len(run.split.val), [p.name for p in phases])
    warm = {k: f"{pair.warmup[k]} ({len(run.warmup[k])} images)" for k in PAIR} if run.warmup else None
    log.info("pair_init=%s: A init %s seed %d%s, B init %s seed %d%s%s", pair.mode, pair.inits["a"], pair.seeds["a"],
             f" warm-up on {warm['a']}" if warm else "", pair.inits["b"], pair.seeds["b"],
             f" warm-up on {warm['b']}" if warm else "", "; one input block per model" if run.stacked else "")

    records: list[PhaseRecord] = []
    pending: PhaseRecord | None = None  # a finished phase whose weights the pair needs before the next one
    fits = 0  # phases trained by this process
    for phase in phases:
        record = read_done(run_dir, phase)
        if record is not None:
            log.info("%s finished earlier: skipping it (delete %s to retrain it)", phase.name,
                     run_dir / phase.name / DONE)
            records.append(record)
            pending = record
            continue
        if pending is not None:
            for key in PAIR:
                load_phase_weights(run.models[key], pending.checkpoint(run_dir, key), key)
        L.seed_everything(int(cfg.seed) + phase.index, workers=True, verbose=False)
        step_offset = records[-1].step_end if records else 0
        phase_start = time.perf_counter()
        pseudo = None if phase.warmup else label_phase(run, phase, records[-1], step_offset)
        records.append(fit_phase(run, phase, step_offset, pseudo, len(phases), first_fit=not fits))
        fits += 1
        pending = None  # the pair now holds this phase's best weights
        left = len(phases) - len(records)
        if left and not phase.warmup:  # the next phases cost about what this one did (labeling + training)
            log.info("%d phase(s) left: about %s", left, format_duration(left * (time.perf_counter() - phase_start)))
    return dmt_results(cfg, run.split, pair, run.warmup, run.stacked, records, time.perf_counter() - start)
