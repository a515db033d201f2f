"""The Lightning layer's assembly: the module, the loggers and the Trainer of a run, from its config.

A run builds its loggers once (:func:`build_loggers`: one W&B run, one ``metrics.csv``, continued by a
rerun) and one Trainer per stage (:func:`build_trainer`; DMT: the warm-up and each phase), whose loggers
share one step axis through :class:`dmtc.loggers.StepOffsetLogger`. Every Trainer writes its checkpoints
atomically (:class:`dmtc.checkpoint_io.AtomicCheckpointIO`).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from dmtc.checkpoint_io import AtomicCheckpointIO
from dmtc.dashboards import WandbMedia, wandb_loggers
from dmtc.divergence import DivergenceGuard
from dmtc.module import SegmentationModule
from dmtc.progress import StageProgress, banner_once
from dmtc.settings import OptimSettings, optim_settings
from dmtc.speed import configure_cuda, resolve_precision

#: dataset keys that describe the training run's schedule, not the data: not carried into checkpoints
_SCHEDULE_KEYS = ("schedule", "schedules")


#: dataset keys holding paths: made absolute, so a checkpoint's settings work from any working directory
_PATH_KEYS = ("root", "split_dir", "resized_cache_dir")


#: Lightning's warnings about what every dmtc resume does by design: reuse its checkpoint folder, and continue
#: an epoch stopped by an interrupt (the rest of that epoch draws a fresh shuffle of the data)
_RESUME_WARNINGS = (r"Checkpoint directory .* exists and is not empty",
                    r"You're resuming from a checkpoint that ended before the epoch ended")


def quiet_resume_warnings() -> None:
    """Ignore :data:`_RESUME_WARNINGS` (idempotent: the filters are added once, since every change to the
    warning filters makes Python show again the warnings it had already shown once)."""
    present = {f[1].pattern for f in warnings.filters if f[0] == "ignore" and f[1] is not None}
    for expected in _RESUME_WARNINGS:
        if expected not in present:
            warnings.filterwarnings("ignore", message=expected)


def run_record(cfg: DictConfig) -> dict[str, Any]:
    """What a checkpoint carries of its training run for evaluation and labeling (:mod:`dmtc.from_checkpoint`):
    the resolved ``dataset`` settings (paths absolute, schedules dropped), ``split``, ``sid`` and the method."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    for key in _SCHEDULE_KEYS:
        dataset.pop(key, None)
    for key in _PATH_KEYS:
        if dataset.get(key):
            dataset[key] = str(Path(dataset[key]).expanduser().absolute())
    return {"dataset": dataset, "split": str(cfg.split), "sid": int(cfg.sid), "method": str(cfg.method.name)}


def module_kwargs(cfg: DictConfig, optim: OptimSettings) -> dict[str, Any]:
    """The module's arguments of every run: the dataset's classes, the optimisation settings and the
    run record its checkpoints carry."""
    return {"num_classes": int(cfg.dataset.num_classes), "class_names": list(cfg.dataset.class_names),
            **asdict(optim), "run_record": run_record(cfg)}


def build_module(cfg: DictConfig, models: dict[str, Any]) -> SegmentationModule:
    """LightningModule holding ``models`` with the optimisation settings of ``cfg.optim``."""
    return SegmentationModule(models, **module_kwargs(cfg, optim_settings(cfg)))


def _resume_kwargs(node: DictConfig, cfg: DictConfig) -> dict[str, Any]:
    """Arguments that make logger ``node`` continue the run folder's log (:mod:`dmtc.loggers`): a
    ``WandbLogger`` gets the run's stored W&B id (unless the config sets ``id``/``version``) and
    ``resume="allow"``; a :class:`dmtc.loggers.CSVLogger` gets ``resume``. ``overwrite=true``
    starts both anew."""
    from lightning.pytorch.loggers import WandbLogger

    from dmtc.loggers import CSVLogger, finish_other_wandb_run, wandb_run_id

    target = node.get("_target_")
    if not target:
        return {}
    cls = get_class(str(target))
    fresh = bool(cfg.get("overwrite", False))
    if issubclass(cls, WandbLogger):
        labels = {k: v for k, v in wandb_labels(cfg).items() if node.get(k) is None}
        if node.get("id") or node.get("version"):
            return labels
        run_id = wandb_run_id(cfg.paths.output_dir, fresh=fresh)
        finish_other_wandb_run(run_id)
        return {"id": run_id, "resume": node.get("resume") or "allow", **labels}
    if issubclass(cls, CSVLogger):
        return {"resume": not fresh}
    return {}


def wandb_labels(cfg: DictConfig) -> dict[str, Any]:
    """How a W&B run is filed: ``job_type`` = the method, ``tags`` = ``dataset:…``, ``split:…``, ``sid:…``, and
    ``group`` = in a Hydra multirun the sweep folder's name (the runs of one sweep side by side), else
    ``<dataset>-split<split>-<method>``. A key set under ``logger.wandb`` wins."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    labels: dict[str, Any] = {"job_type": str(cfg.method.name),
                              "tags": [f"dataset:{cfg.dataset.name}", f"split:{cfg.split}", f"sid:{cfg.sid}"],
                              "group": f"{cfg.dataset.name}-split{cfg.split}-{cfg.method.name}"}
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        labels["group"] = Path(str(HydraConfig.get().sweep.dir)).name
    return labels


def build_loggers(cfg: DictConfig) -> list[Any]:
    """The configured Lightning loggers, with the composed config logged as hyperparameters.

    Build them once per run: DMT passes the same instances to every phase's Trainer (one W&B run). A rerun
    of the same command continues the same logs: the same W&B run id, the same ``metrics.csv`` (see
    :mod:`dmtc.loggers`); ``overwrite=true`` starts new ones.
    """
    loggers = [instantiate(c, **_resume_kwargs(c, cfg)) for c in (cfg.get("logger") or {}).values() if c is not None]
    for logger in loggers:  # W&B shows the nested config as dotted columns (dataset.name, optim.lr, ...)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return loggers


def build_trainer(
    cfg: DictConfig,
    *,
    loggers: list[Any] | None = None,
    exclude_callbacks: tuple[str, ...] = (),
    extra_callbacks: list[Any] | None = None,
    stage: str | None = None,
    lr_key: str = "optim.lr",
    **overrides: Any,
) -> L.Trainer:
    """Lightning Trainer from ``cfg.trainer`` with the configured callbacks and loggers, saving checkpoints
    through :class:`dmtc.checkpoint_io.AtomicCheckpointIO` (unless ``plugins`` are given).

    ``loggers`` reuses logger instances (else they are built from ``cfg.logger``); ``exclude_callbacks``
    names ``cfg.callbacks`` entries to leave out and ``extra_callbacks`` adds instances (DMT's per-model
    checkpoints); ``stage`` names the stage in the progress display (:mod:`dmtc.progress`) and in the
    messages of a divergence or an interrupt; ``lr_key`` is the config key of the stage's learning rate
    (:class:`dmtc.divergence.DivergenceGuard` suggests lowering it); ``overrides`` replace ``cfg.trainer``
    arguments. Lightning's start-up lines are printed once per process. A run that logs to W&B also gets
    :class:`dmtc.dashboards.WandbMedia` (per-class tables and mask overlays of ``media.val_images`` val
    images at each validation); inside a SLURM job the Trainer reads the allocation
    (:func:`cluster_plugins`). ``trainer.precision=auto`` is resolved for the device
    (:func:`dmtc.speed.resolve_precision`) and the CUDA flags (TF32, cuDNN autotuning) are set here, once per
    Trainer (:func:`dmtc.speed.configure_cuda`).
    """
    banner_once()
    quiet_resume_warnings()
    configure_cuda(cfg)
    if loggers is None:
        loggers = build_loggers(cfg)
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or name in exclude_callbacks:
            continue
        if name == "lr_monitor" and not loggers:
            continue  # LearningRateMonitor refuses to run without a logger
        callbacks.append(instantiate(node))
    callbacks.extend(extra_callbacks or [])
    media = cfg.get("media")
    if media is not None and wandb_loggers(loggers):  # W&B panels beyond scalars (dmtc.dashboards)
        callbacks.append(WandbMedia(images=int(media.val_images), max_side=int(media.max_side)))
    for callback in callbacks:
        if stage and isinstance(callback, StageProgress):
            callback.stage = stage
        if isinstance(callback, DivergenceGuard):
            callback.lr_key, callback.run_dir = lr_key, str(cfg.paths.output_dir)
    kwargs: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False,
                              "sync_batchnorm": sync_batchnorm(cfg.trainer),
                              "precision": resolve_precision(cfg.trainer.get("precision", "32-true"),
                                                             cfg.trainer.get("accelerator", "auto"))}
    if not cfg.trainer.get("plugins"):
        kwargs["plugins"] = [AtomicCheckpointIO(), *cluster_plugins()]
    kwargs.update(overrides)
    return instantiate(cfg.trainer, **kwargs)


def cluster_plugins() -> list[Any]:
    """Inside a SLURM job: Lightning's SLURM environment (ranks, nodes and addresses from SLURM) with its
    automatic requeue off. A job is requeued by one mechanism only, submitit's (``hydra/launcher=slurm``): it
    owns the job, requeues it on its signal (USR2, or USR1: :mod:`dmtc.interrupts` saves the step first)
    whatever stage the run is in (training, labeling, between phases), and the requeued job reruns the same
    Hydra job in the same folder, which resumes it; Lightning's would also save ``hpc_ckpt_*.ckpt`` files and
    restore from them next to our ``last.ckpt``."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=False)]


def sync_batchnorm(trainer_cfg: DictConfig) -> bool:
    """``trainer.sync_batchnorm``: ``auto`` (the default) is on for DDP over several GPUs (BatchNorm statistics
    over the global batch, as the reference's batch of 8 on one GPU; a few images per GPU are not that) and
    off otherwise (one device; CPU, where torch has no SyncBatchNorm); ``true``/``false`` force it."""
    value = trainer_cfg.get("sync_batchnorm", "auto")
    if str(value).lower() != "auto":
        return bool(value)
    import torch

    strategy = trainer_cfg.get("strategy")
    name = str(strategy if isinstance(strategy, str) else (strategy or {}).get("_target_", "")).lower()
    devices, nodes = trainer_cfg.get("devices", 1), int(trainer_cfg.get("num_nodes", 1) or 1)
    on_gpu = str(trainer_cfg.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if devices in (None, "auto", -1, "-1"):
        count = torch.cuda.device_count() if on_gpu else 1
    elif isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        count = len(devices)
    else:
        count = int(devices)
    distributed = "ddp" in name or name in ("", "auto")  # auto: Lightning picks DDP for several GPUs
    return distributed and on_gpu and count * nodes > 1
