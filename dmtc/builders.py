"""Build the run's parts (data, model, module, trainer) from a composed Hydra config.

Entry points and tests call these with a ``DictConfig``; nothing here reads global state except Hydra's
instantiation of ``_target_`` nodes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dmtc.data.datamodule import SegmentationDataModule
from dmtc.data.layouts import DatasetLayout
from dmtc.data.splits import dmt_split, read_list, split_ratio, write_list
from dmtc.data.transforms import build_eval_transform, build_train_transform
from dmtc.errors import DMTCError
from dmtc.models import deeplab_v2
from dmtc.module import SegmentationModule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Names of one labeled/unlabeled split and the validation set."""

    labeled: list[str]
    unlabeled: list[str]
    val: list[str]


def prepare_dataset(cfg: DictConfig) -> None:
    """Create generated datasets (the embedded synthetic set) on first use; real datasets are left alone."""
    generate = cfg.dataset.get("generate")
    if generate is None:
        return
    from dmtc.data.synthetic import SyntheticSpec, generate_synthetic

    overrides = OmegaConf.to_container(generate.get("spec") or {}, resolve=True)
    known = {f.name for f in fields(SyntheticSpec)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise DMTCError(
            f"unknown synthetic dataset option(s) {unknown} under dataset.generate.spec; known: {sorted(known)}"
        )
    spec = SyntheticSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    generate_synthetic(Path(cfg.dataset.root), spec, seed=int(generate.seed))


def build_layout(cfg: DictConfig) -> DatasetLayout:
    """The dataset's on-disk layout from ``cfg.dataset``."""
    ds = cfg.dataset
    label_map = None
    if ds.get("label_map") is not None:
        label_map = np.full(256, 255, dtype=np.uint8)
        for raw, train_id in OmegaConf.to_container(ds.label_map, resolve=True).items():
            label_map[int(raw)] = int(train_id)
    return DatasetLayout(
        root=Path(ds.root),
        image_template=ds.image_template,
        label_template=ds.label_template,
        list_template=ds.get("list_template"),
        label_map=label_map,
        name=ds.name,
    )


def resolve_split(cfg: DictConfig, layout: DatasetLayout) -> Split:
    """Labeled/unlabeled/val names for ``split``/``sid``.

    ``split=1`` labels every training image. Otherwise user-supplied lists
    (``dataset.split_lists.labeled``/``unlabeled`` relative to the root) win; else DMT's protocol
    (:func:`dmtc.data.splits.dmt_split`) generates them into ``dataset.split_dir`` (the root may be
    read-only) and says so in the log.
    """
    ds = cfg.dataset
    split, sid = str(cfg.split), int(cfg.sid)
    ratio = split_ratio(split)
    val = layout.names(ds.val_subset)
    train = layout.names(ds.train_subset)
    if ratio == 1:
        return Split(sorted(train), [], val)
    user = ds.get("split_lists") or {}
    if user.get("labeled"):
        labeled_path = layout.root / user.labeled.format(split=split, sid=sid)
        unlabeled_path = layout.root / user.unlabeled.format(split=split, sid=sid)
        if labeled_path.is_file():
            if not unlabeled_path.is_file():
                raise DMTCError(f"found {labeled_path} but not its unlabeled list {unlabeled_path}")
            log.info("using split lists %s and %s", labeled_path, unlabeled_path)
            return Split(read_list(labeled_path), read_list(unlabeled_path), val)
    split_dir = Path(ds.split_dir)
    labeled_path = split_dir / f"{split}_labeled_{sid}.txt"
    unlabeled_path = split_dir / f"{split}_unlabeled_{sid}.txt"
    labeled, unlabeled = dmt_split(train, ratio, sid)
    if not (labeled_path.is_file() and read_list(labeled_path) == labeled):
        write_list(labeled_path, labeled)
        write_list(unlabeled_path, unlabeled)
        log.info("generated DMT split lists %s (%d labeled) and %s", labeled_path, len(labeled), unlabeled_path)
    return Split(labeled, unlabeled, val)


def input_normalization(cfg: DictConfig) -> dict[str, Any]:
    """Input pipeline of the backbone's initialisation (mean, std, channel order, value scale)."""
    norm = cfg.backbone.input
    return {
        "mean": list(norm.mean),
        "std": list(norm.std),
        "bgr": bool(norm.bgr),
        "value_scale": float(norm.value_scale),
    }


def build_datamodule(cfg: DictConfig, *, check_files: bool = True) -> tuple[SegmentationDataModule, Split]:
    """Datamodule for the labeled split and validation set; checks every listed file exists first."""
    prepare_dataset(cfg)
    layout = build_layout(cfg)
    split = resolve_split(cfg, layout)
    ds = cfg.dataset
    if check_files:
        layout.check_files(ds.train_subset, split.labeled)
        layout.check_files(ds.val_subset, split.val)
    norm = input_normalization(cfg)
    base_size = list(ds.base_size) if ds.get("base_size") else None
    train_tf = build_train_transform(
        crop_size=list(ds.crop_size), scale_range=list(ds.scale_range), base_size=base_size, flip=ds.flip, **norm
    )
    eval_base = list(ds.eval_size) if ds.get("eval_size") else None
    eval_tf = build_eval_transform(base_size=eval_base, **norm)
    datamodule = SegmentationDataModule(
        layout,
        split.labeled,
        split.val,
        train_tf,
        eval_tf,
        batch_size=ds.batch_size,
        val_batch_size=ds.val_batch_size,
        num_workers=ds.num_workers,
        train_subset=ds.train_subset,
        val_subset=ds.val_subset,
    )
    return datamodule, split


def build_model(cfg: DictConfig) -> Any:
    """DeepLab-v2 for the dataset's classes, initialised as ``backbone.init`` says."""
    init = cfg.backbone.get("init", "none")
    if init not in ("none", "imagenet"):
        raise DMTCError(f"backbone.init={init!r} is not supported here; use 'imagenet' or 'none'")
    pretrained = cfg.backbone.weights if init == "imagenet" else None
    return deeplab_v2(
        int(cfg.dataset.num_classes),
        backbone=cfg.backbone.name,
        aspp_dilations=tuple(cfg.model.aspp_dilations),
        pretrained=pretrained,
    )


def build_module(cfg: DictConfig, models: dict[str, Any]) -> SegmentationModule:
    """LightningModule holding ``models`` with the optimisation settings of ``cfg.optim``."""
    return SegmentationModule(
        models,
        num_classes=int(cfg.dataset.num_classes),
        class_names=list(cfg.dataset.class_names),
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        poly_power=cfg.optim.poly_power,
        head_lr_mult=cfg.optim.head_lr_mult,
    )


def build_loggers(cfg: DictConfig) -> list[Any]:
    """The configured Lightning loggers, with the composed config logged as hyperparameters.

    Build them once per run: DMT passes the same instances to every phase's Trainer (one W&B run).
    """
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return loggers


def build_trainer(
    cfg: DictConfig,
    *,
    loggers: list[Any] | None = None,
    exclude_callbacks: tuple[str, ...] = (),
    extra_callbacks: list[Any] | None = None,
    **overrides: Any,
) -> L.Trainer:
    """Lightning Trainer from ``cfg.trainer`` with the configured callbacks and loggers.

    ``loggers`` reuses logger instances (else they are built from ``cfg.logger``); ``exclude_callbacks``
    names ``cfg.callbacks`` entries to leave out and ``extra_callbacks`` adds instances (DMT's per-model
    checkpoints); ``overrides`` replace ``cfg.trainer`` arguments.
    """
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
    kwargs: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False}
    kwargs.update(overrides)
    return instantiate(cfg.trainer, **kwargs)
