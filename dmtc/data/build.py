"""The data of a run from its config: the layout on disk, the split, transforms and the DataModule.

:func:`build_datamodule` is what training calls: it generates the embedded synthetic set on first use,
resolves the split (:mod:`dmtc.data.split_resolver`), checks the files, builds each model's input
pipeline (:mod:`dmtc.models.inits`) and, with ``dataset.resized_cache``, reads images from the one-time
resized copy (:mod:`dmtc.data.resized_cache`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from torchvision.transforms import v2

from dmtc.data.datamodule import SegmentationDataModule
from dmtc.data.datasets import keep_decoded_in_memory
from dmtc.data.layouts import DatasetLayout
from dmtc.data.split_resolver import Split, resolve_split
from dmtc.data.transforms import PAD_FILLS, build_eval_transform, build_train_transform, stack_model_inputs
from dmtc.data.validation import (
    NameSet,
    allowed_label_values,
    check_folders,
    check_list_files,
    validate_dataset,
)
from dmtc.errors import DMTCError
from dmtc.models.inits import input_normalization


def prepare_dataset(cfg: DictConfig) -> None:
    """Create generated datasets (the embedded synthetic set) on first use (real datasets are left alone), and
    size this process's cache of decoded files (``dataset.ram_cache_mb``, :func:`keep_decoded_in_memory`)."""
    keep_decoded_in_memory(cfg.dataset.get("ram_cache_mb"))
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


def label_map_table(cfg: DictConfig) -> dict[int, int] | None:
    """``{raw label value: train id}`` of ``dataset.label_map``: a mapping, or the name of a label table
    (``cityscapes``: cityscapesscripts' label ids → 19 train ids, void ids → 255); ``None`` = no mapping."""
    spec = cfg.dataset.get("label_map")
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec == "cityscapes":
            from dmtc.data.cityscapes import cityscapes_label_map

            return cityscapes_label_map()
        raise DMTCError(f"dataset.label_map={spec!r} is not a known label table; use 'cityscapes' or a mapping")
    return {int(raw): int(tid) for raw, tid in OmegaConf.to_container(spec, resolve=True).items()}


def check_classes(cfg: DictConfig) -> None:
    """``dataset.num_classes`` and ``dataset.class_names`` agree (every per-class table and the mean need both)."""
    ds = cfg.dataset
    try:
        num_classes = int(ds.num_classes)
    except (TypeError, ValueError) as err:
        raise DMTCError(f"dataset.num_classes={ds.num_classes!r} is not a number of classes") from err
    names = list(ds.class_names)
    if num_classes < 1 or len(names) != num_classes:
        raise DMTCError(
            f"dataset.num_classes={num_classes} but dataset.class_names has {len(names)} names ({names}): give one "
            "name per class, e.g. dataset.num_classes=3 'dataset.class_names=[background,cat,dog]'"
        )


def build_layout(cfg: DictConfig) -> DatasetLayout:
    """The dataset's on-disk layout from ``cfg.dataset`` (raw values outside ``label_map`` become 255); the
    class settings are checked first (:func:`check_classes`)."""
    check_classes(cfg)
    ds = cfg.dataset
    table = label_map_table(cfg)
    label_map = None
    if table is not None:
        label_map = np.full(256, 255, dtype=np.uint8)
        for raw, train_id in table.items():
            label_map[raw] = train_id
    return DatasetLayout(
        root=Path(ds.root),
        image_template=ds.image_template,
        label_template=ds.label_template,
        list_template=ds.get("list_template"),
        label_map=label_map,
        name=ds.name,
    )


def resize_options(cfg: DictConfig) -> dict[str, bool]:
    """``{"antialias": dataset.antialias}`` for every image resize of the dataset (training, labeling,
    evaluation, resized cache): antialiased bilinear (ours, default) or plain bilinear (the reference's
    tensor resize: city/voc)."""
    return {"antialias": bool(cfg.dataset.get("antialias", True))}


def pad_fill(cfg: DictConfig) -> str:
    """``dataset.pad_fill``: how padded image pixels look (crops, VOC's 505×505 evaluation, sliding windows):
    ``mean`` (0 after normalisation) or ``black`` (raw 0, the reference's)."""
    value = str(cfg.dataset.get("pad_fill") or "mean")
    if value not in PAD_FILLS:
        raise DMTCError(f"dataset.pad_fill={value!r}: use mean (0 after normalisation) or black (raw 0 before "
                        "normalisation, the reference code's padding)")
    return value


def validate_split(cfg: DictConfig, layout: DatasetLayout, split: Split) -> None:
    """Check the split's files before training (:mod:`dmtc.data.validation`): every listed image exists,
    labeled and val images have labels, and a sample of labels holds only values of the class set."""
    ds = cfg.dataset
    allowed = allowed_label_values(int(ds.num_classes), label_map_table(cfg))
    name_sets = [
        NameSet(ds.train_subset, split.labeled, split.sources.get("labeled", "the labeled list")),
        NameSet(split.unlabeled_subset or ds.train_subset, split.unlabeled,
                split.sources.get("unlabeled", "the unlabeled list"), labels=False),
        NameSet(ds.val_subset, split.val, split.sources.get("val", "the validation list")),
    ]
    validate_dataset(layout, name_sets, allowed, sample=int(ds.get("validate_samples", 8)))


def build_datamodule(
    cfg: DictConfig, *, check_files: bool = True,
    input_norms: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[SegmentationDataModule, Split]:
    """Datamodule for the labeled split and validation set; validates the data on disk first (fast: names
    are checked, a sample of labels decoded), so a bad dataset fails before any training starts.

    ``input_norms``: the input pipeline of each model trained on these batches (default: the config's
    own, :func:`input_normalization`); when they differ (a DMT pair from two inits) shared batches carry one
    normalised block per model (:class:`StackedModelInput`). Given as ``{key: norm}``, each model also gets
    its own training transform for per-model streams (``SegmentationDataModule.model_train_transforms``)."""
    prepare_dataset(cfg)
    layout = build_layout(cfg)
    ds = cfg.dataset
    if check_files:
        check_folders(layout, [ds.train_subset, ds.val_subset])
        if ds.get("list_required"):
            check_list_files(layout, [ds.train_subset, ds.val_subset])
    split = resolve_split(cfg, layout)
    if check_files:
        validate_split(cfg, layout, split)
    keyed = dict(input_norms) if isinstance(input_norms, Mapping) else None
    if keyed is not None:
        norms = [dict(n) for n in keyed.values()]
    else:
        norms = [dict(n) for n in input_norms] if input_norms else [input_normalization(cfg)]
    base_size = list(ds.base_size) if ds.get("base_size") else None

    def train_transform(norm: Mapping[str, Any]) -> v2.Compose:
        return build_train_transform(crop_size=list(ds.crop_size), scale_range=list(ds.scale_range),
                                     base_size=base_size, flip=ds.flip, pad_fill=pad_fill(cfg),
                                     **resize_options(cfg), **dict(norm))

    train_tf = stack_model_inputs(train_transform(norms[0]), norms)
    model_tfs = {key: train_transform(norm) for key, norm in keyed.items()} if keyed else None
    eval_base = list(ds.eval_size) if ds.get("eval_size") else None
    eval_tf = stack_model_inputs(build_eval_transform(base_size=eval_base, **resize_options(cfg), **norms[0]), norms)
    val_layout = layout
    if ds.get("resized_cache"):
        layout, val_layout = resized_layouts(cfg, layout, split)
    datamodule = SegmentationDataModule(
        layout,
        split.labeled,
        split.val,
        train_tf,
        eval_tf,
        batch_size=ds.batch_size,
        val_batch_size=ds.val_batch_size,
        num_workers=ds.num_workers,
        prefetch_factor=ds.get("prefetch_factor"),
        train_subset=ds.train_subset,
        val_subset=ds.val_subset,
        val_layout=val_layout,
        model_train_transforms=model_tfs,
    )
    return datamodule, split


def resized_layouts(cfg: DictConfig, layout: DatasetLayout, split: Split) -> tuple[DatasetLayout, DatasetLayout]:
    """(training layout, validation layout) reading the one-time resized cache (``dataset.resized_cache``,
    :mod:`dmtc.data.resized_cache`) built or completed here: the split's labeled and unlabeled images at
    ``dataset.base_size`` (DMT §4.1: Cityscapes 512×1024), and the validation images too when
    ``dataset.eval_size`` is the same size (DMT's protocol); otherwise validation keeps the originals."""
    from dmtc.data.resized_cache import build_resized_cache, cache_root

    ds = cfg.dataset
    if not ds.get("base_size"):
        raise DMTCError(f"dataset.resized_cache=true needs dataset.base_size (dataset={ds.name} has none): the "
                        "cache stores images at the training base size")
    size = [int(v) for v in ds.base_size]
    names = {ds.train_subset: list(split.labeled)}
    names.setdefault(split.unlabeled_subset or ds.train_subset, []).extend(split.unlabeled)
    same_eval = bool(ds.get("eval_size")) and [int(v) for v in ds.eval_size] == size
    if same_eval:
        names.setdefault(ds.val_subset, []).extend(split.val)
    base_dir = ds.get("resized_cache_dir") or Path(cfg.paths.cache_dir) / "resized" / str(ds.name)
    antialias = resize_options(cfg)["antialias"]
    cached = build_resized_cache(layout, names, size, cache_root(base_dir, size, antialias),
                                 processes=int(ds.get("num_workers") or 0), antialias=antialias)
    return cached, cached if same_eval else layout
