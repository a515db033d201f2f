"""Build the run's parts (data, model, module, trainer) from a composed Hydra config.

Entry points and tests call these with a ``DictConfig``; nothing here reads global state except Hydra's
instantiation of ``_target_`` nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torchvision import tv_tensors
from torchvision.transforms import v2

from dmtc.data.datamodule import SegmentationDataModule
from dmtc.data.layouts import DatasetLayout
from dmtc.data.splits import (
    SBD_SPLIT,
    dms_subset,
    dmt_split,
    parse_split,
    read_list,
    sbd_split,
    split_ratio,
    strip_template,
    write_list,
)
from dmtc.data.transforms import PAD_FILLS, ToModelInput, build_eval_transform, build_train_transform
from dmtc.data.validation import NameSet, allowed_label_values, check_folders, check_list_files, validate_dataset
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
    #: where each list came from ({"labeled": path or description, "unlabeled": ..., "val": ...})
    sources: dict[str, str] = field(default_factory=dict)
    #: what results.json reports as the split: ``split`` (8, 20, 106-l, sbd, ...) or, with an unlabeled image
    #: folder, ``<train subset>+<unlabeled subset>``
    name: str = ""
    #: the subset (folder) the unlabeled images live in: the training subset, or ``dataset.unlabeled_subset``
    unlabeled_subset: str = ""


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

def _user_lists(cfg: DictConfig, layout: DatasetLayout, split: str, sid: int) -> tuple[Path, Path] | None:
    """User-supplied (labeled, unlabeled) list files for ``split``/``sid`` if present (DMT's names: the split
    name or its ratio, e.g. ``30_labeled_0.txt`` or ``29.75_labeled_0.txt``)."""
    user = cfg.dataset.get("split_lists") or {}
    if not user.get("labeled"):
        if user.get("unlabeled"):
            raise DMTCError(f"dataset.split_lists.unlabeled={user.unlabeled} is set but dataset.split_lists.labeled "
                            "is not: give both lists (or put unlabeled images in the dataset's unlabeled folder, "
                            "dataset.unlabeled_subset)")
        return None
    names = [split]
    try:
        ratio = split_ratio(split)
        names.append(f"{ratio:g}")
    except DMTCError:
        pass
    for name in dict.fromkeys(names):
        labeled = layout.root / user.labeled.format(split=name, sid=sid)
        unlabeled = layout.root / user.unlabeled.format(split=name, sid=sid)
        if labeled.is_file():
            if not unlabeled.is_file():
                raise DMTCError(
                    f"found the split list {labeled} but not its unlabeled list {unlabeled}: add it, or remove "
                    f"{labeled.name} to have both generated"
                )
            return labeled, unlabeled
    return None


def resolve_split(cfg: DictConfig, layout: DatasetLayout) -> Split:
    """:func:`split_lists`, then ``dataset.unlabeled_max_images=N`` keeps N evenly spaced unlabeled images
    (``debug=smoke``: a DMT phase labels a dozen images, not the whole split)."""
    ds = cfg.dataset
    split = unlabeled_folder_split(cfg, layout) or split_lists(cfg, layout)
    split = replace(split, name=split.name or str(cfg.split),
                    unlabeled_subset=split.unlabeled_subset or ds.train_subset)
    limit = ds.get("unlabeled_max_images")
    if limit and int(limit) < len(split.unlabeled):
        count, names = int(limit), split.unlabeled
        kept = [names[i * len(names) // count] for i in range(count)]
        sources = {**split.sources, "unlabeled": f"{split.sources.get('unlabeled', 'the unlabeled list')} (evenly "
                                                 f"spaced {count} of them: dataset.unlabeled_max_images)"}
        split = replace(split, unlabeled=kept, sources=sources)
    if not split.labeled:
        ratio = f"split={cfg.split} of {len(split.labeled) + len(split.unlabeled)} training images"
        raise DMTCError(f"{ratio} leaves no labeled image: use a smaller split ratio (split=2, 4, 8, ...) or "
                        "add labeled images")
    return split


def unlabeled_folder_split(cfg: DictConfig, layout: DatasetLayout) -> Split | None:
    """Your own data with unlabeled images that have no masks: when ``dataset.unlabeled_subset`` (folder
    dataset: ``unlabeled``) exists on disk (``images/unlabeled/`` or ``lists/unlabeled.txt``), every image
    of the training subset is labeled and the unlabeled subset's images are the unlabeled split (no label
    files needed; pseudo-label quality is then not reported). ``split``/``sid`` are not used. None if there
    is no such subset."""
    ds = cfg.dataset
    subset = ds.get("unlabeled_subset")
    if not subset or not layout.has_subset(str(subset)):
        return None
    subset = str(subset)
    labeled, unlabeled = sorted(layout.names(ds.train_subset)), layout.names(subset)
    val = _val_names(cfg, layout)
    log.info("dataset.unlabeled_subset=%s: %d labeled images (all of '%s') and %d unlabeled images of '%s' "
             "(split/sid are not used; dataset.unlabeled_subset=null splits '%s' by split= instead)", subset,
             len(labeled), ds.train_subset, len(unlabeled), subset, ds.train_subset)
    sources = {"labeled": _list_source(layout, ds.train_subset), "unlabeled": _list_source(layout, subset),
               "val": val[1]}
    return Split(labeled, unlabeled, val[0], sources, name=f"{ds.train_subset}+{subset}", unlabeled_subset=subset)


def _val_names(cfg: DictConfig, layout: DatasetLayout) -> tuple[list[str], str]:
    """Validation names and where they came from; ``dataset.val_max_images`` keeps an evenly spaced subset."""
    ds = cfg.dataset
    val = layout.names(ds.val_subset)
    val_source = _list_source(layout, ds.val_subset)
    limit = ds.get("val_max_images")
    if limit and int(limit) < len(val):
        count = int(limit)
        val = [val[i * len(val) // count] for i in range(count)]
        val_source += f" (evenly spaced {count} of them: dataset.val_max_images)"
    return val, val_source


def split_lists(cfg: DictConfig, layout: DatasetLayout) -> Split:
    """Labeled/unlabeled/val names for ``split``/``sid`` following DMT's lists (DMT §4.1).

    * ``split=1`` labels every training image.
    * ``split=<ratio>`` (2, 4, 8, 20, 30, 50, 106, ...): user-supplied lists (``dataset.split_lists``,
      relative to the root; DMT's ``{split}_labeled_{sid}.txt`` files) win; otherwise
      :func:`dmtc.data.splits.dmt_split` generates them from the sorted training names.
    * ``split=<s>-l`` / ``<s>-r``: a difference-maximized 80% subset of split ``s`` (user lists of that
      name win; otherwise :func:`dmtc.data.splits.dms_subset` of the split ``s`` lists); unlabeled = split
      ``s``'s unlabeled list.
    * ``split=sbd`` (VOC): labeled = the ``dataset.sbd_labeled_subset`` list (``train.txt``), unlabeled =
      the other training ids.

    Generated lists are written to ``dataset.split_dir`` (the dataset root may be read-only) and logged.
    ``dataset.val_max_images`` keeps an evenly spaced subset of the validation images (fast model selection).
    """
    ds = cfg.dataset
    split, sid = str(cfg.split), int(cfg.sid)
    base, side = parse_split(split)
    val, val_source = _val_names(cfg, layout)
    train_source = _list_source(layout, ds.train_subset)
    train_cache: list[list[str]] = []

    def train() -> list[str]:
        if not train_cache:
            train_cache.append(layout.names(ds.train_subset))
        return train_cache[0]

    def lists(name: str, split_id: int) -> tuple[list[str], list[str], str]:
        found = _user_lists(cfg, layout, name, split_id)
        if found is not None:
            def clean(path: Path) -> list[str]:
                return [strip_template(n, layout.image_template, ds.train_subset) for n in read_list(path)]

            return clean(found[0]), clean(found[1]), f"{found[0]} and {found[1]}"
        labeled, unlabeled = dmt_split(train(), split_ratio(name), split_id)
        return labeled, unlabeled, ""

    if base == SBD_SPLIT:
        subset = ds.get("sbd_labeled_subset")
        if not subset:
            raise DMTCError(f"split=sbd is PASCAL VOC's SBD split; dataset={ds.name} has no dataset.sbd_labeled_subset")
        labeled, unlabeled = sbd_split(layout.names(subset), train())
        sources = {"labeled": _list_source(layout, subset), "unlabeled": f"{train_source} minus the labeled ids"}
        return Split(labeled, unlabeled, val, {**sources, "val": val_source})
    if side is None and split_ratio(base) == 1:
        return Split(sorted(train()), [], val, {"labeled": train_source, "unlabeled": "-", "val": val_source})
    found = _user_lists(cfg, layout, split, sid)
    if found is not None:
        log.info("using split lists %s and %s", *found)
        labeled, unlabeled, source = lists(split, sid)
        return Split(labeled, unlabeled, val, {"labeled": str(found[0]), "unlabeled": str(found[1]), "val": val_source})
    if side is None:
        labeled, unlabeled, source = lists(base, sid)
    else:
        labeled = dms_subset(lambda name, split_id: lists(name, split_id)[0], base, sid, side)
        _, unlabeled, source = lists(base, sid)
    if source:  # from user lists of the base split: nothing generated
        return Split(labeled, unlabeled, val, {"labeled": f"{split} subset of {source}", "unlabeled": source,
                                               "val": val_source})
    labeled_path, unlabeled_path = _write_split(cfg, split, sid, labeled, unlabeled)
    return Split(labeled, unlabeled, val,
                 {"labeled": str(labeled_path), "unlabeled": str(unlabeled_path), "val": val_source})


def _list_source(layout: DatasetLayout, subset: str) -> str:
    if layout.list_template is not None:
        path = layout.root / layout.list_template.format(subset=subset)
        if path.is_file():
            return str(path)
    return f"the '{subset}' image folder of {layout.root}"


def _write_split(cfg: DictConfig, split: str, sid: int, labeled: list[str], unlabeled: list[str]) -> tuple[Path, Path]:
    """Write generated lists to ``dataset.split_dir`` (unless already there, identical) and log where."""
    split_dir = Path(cfg.dataset.split_dir)
    labeled_path = split_dir / f"{split}_labeled_{sid}.txt"
    unlabeled_path = split_dir / f"{split}_unlabeled_{sid}.txt"
    same = (labeled_path.is_file() and unlabeled_path.is_file() and read_list(labeled_path) == labeled
            and read_list(unlabeled_path) == unlabeled)
    if not same:
        try:
            write_list(labeled_path, labeled)
            write_list(unlabeled_path, unlabeled)
        except OSError as err:
            raise DMTCError(
                f"cannot write the generated split lists to {split_dir} ({err.strerror}): set dataset.split_dir "
                "(or paths.cache_dir) to a writable folder"
            ) from err
        log.info("generated DMT split lists %s (%d labeled) and %s (%d unlabeled)", labeled_path, len(labeled),
                 unlabeled_path, len(unlabeled))
    else:
        log.info("using generated split lists %s (%d labeled) and %s", labeled_path, len(labeled), unlabeled_path)
    return labeled_path, unlabeled_path

#: Input pipeline of each backbone initialisation (DESIGN §3, DMT §4.1): torchvision ImageNet weights
#: expect RGB in [0, 1] with ImageNet mean/std; the COCO DeepLab-v2 weights (Caffe) expect BGR in 0–255
#: minus the Caffe mean, std 1. Random init (``none``) uses the ImageNet pipeline.
INIT_INPUTS: dict[str, dict[str, Any]] = {
    "imagenet": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "bgr": False, "value_scale": 1 / 255},
    "coco": {"mean": [104.008, 116.669, 122.675], "std": [1.0, 1.0, 1.0], "bgr": True, "value_scale": 1.0},
    "none": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "bgr": False, "value_scale": 1 / 255},
}
INITS: tuple[str, ...] = tuple(INIT_INPUTS)


def _check_init(init: str) -> str:
    if init not in INIT_INPUTS:
        raise DMTCError(f"backbone.init={init!r} is not an initialisation; use one of {', '.join(INITS)}")
    return init


def input_normalization(cfg: DictConfig, init: str | None = None) -> dict[str, Any]:
    """Input pipeline (mean, std, channel order, value scale) of initialisation ``init`` (default
    ``backbone.init``): :data:`INIT_INPUTS`, with any non-null ``backbone.input`` field overriding it when
    ``init`` is the config's own. So ``backbone.init=coco`` alone switches inputs to Caffe BGR 0–255."""
    own = str(cfg.backbone.get("init", "none"))
    init = _check_init(own if init is None else str(init))
    norm = dict(INIT_INPUTS[init])
    if init == own:
        for key, value in (cfg.backbone.get("input") or {}).items():
            if value is not None and key in norm:
                norm[key] = value
    return {
        "mean": [float(v) for v in norm["mean"]],
        "std": [float(v) for v in norm["std"]],
        "bgr": bool(norm["bgr"]),
        "value_scale": float(norm["value_scale"]),
    }


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

def configured_weights(cfg: DictConfig, init: str) -> str | None:
    """``backbone.weights`` for the config's own init, else ``backbone.weight_files.<init>`` (or None)."""
    own = str(cfg.backbone.get("init", "none"))
    path = cfg.backbone.get("weights") if init == own else (cfg.backbone.get("weight_files") or {}).get(init)
    return str(path) if path else None


def init_weights_path(cfg: DictConfig, init: str | None = None) -> str | None:
    """Weight file of initialisation ``init`` (default ``backbone.init``): ``backbone.weights`` for the
    config's own init, else ``backbone.weight_files.<init>``; ``None`` for ``none``."""
    own = str(cfg.backbone.get("init", "none"))
    init = _check_init(own if init is None else str(init))
    if init == "none":
        return None
    path = configured_weights(cfg, init)
    if not path:
        raise DMTCError(
            f"backbone.init={init} needs a weight file but backbone {cfg.backbone.name} has none configured: set "
            f"backbone.weights (or backbone.weight_files.{init}) to the file, or use backbone.init=none"
        )
    return str(path)


def build_model(cfg: DictConfig, init: str | None = None) -> Any:
    """DeepLab-v2 for the dataset's classes, initialised as ``init`` (default ``backbone.init``) says:

    * ``none``: torchvision's random init;
    * ``imagenet``: a local torchvision ResNet file (``fc.*`` ignored);
    * ``coco``: DMT's converted ``*_coco_resnet101.pt`` or Hung et al.'s original
      ``resnet101COCO-41f33a49.pth`` converted on load (:func:`dmtc.models.checkpoints.load_coco_init`);
      resnet101 only, unless a COCO DeepLab-v2 file of another backbone is configured explicitly
      (``backbone.weight_files.coco``, e.g. a small converted file in tests).

    The model's inputs must follow the same init: :func:`input_normalization` with the same ``init``, which
    the model records in ``model.inputs`` (saved in dmtc checkpoints). ``model.head_init`` and
    ``model.align_corners`` pick the head's initialisation and the logits' upsampling (the released
    DMT/DMTC model: ``aspp_dilations=[6,12]``, ``pytorch``, ``true``: the defaults of ``dataset=city|voc``).
    """
    init = _check_init(str(cfg.backbone.get("init", "none")) if init is None else str(init))
    name = str(cfg.backbone.name)
    if init == "coco" and name != "resnet101" and not configured_weights(cfg, init):
        raise DMTCError(
            f"backbone.init=coco needs backbone=resnet101 (the published COCO DeepLab-v2 weights are a ResNet-101); "
            f"backbone={name} can use init=imagenet or none"
        )
    path = init_weights_path(cfg, init)
    if init == "imagenet" and not Path(path).is_file():
        from dmtc.models.backbones import PRETRAINED_URLS

        url = PRETRAINED_URLS.get(name, "torchvision's ImageNet weights")
        raise DMTCError(
            f"backbone.init=imagenet needs the ImageNet weight file {path} (backbone.weights), which does not exist: "
            f"download {url} there (or into paths.weights_dir), set backbone.weights=/path/to/file, or use "
            "backbone.init=none for a random init"
        )
    model = deeplab_v2(
        int(cfg.dataset.num_classes),
        backbone=name,
        aspp_dilations=tuple(cfg.model.aspp_dilations),
        pretrained=path if init == "imagenet" else None,
        projection_dim=cfg.model.get("projection_dim"),  # DMTC projection head (configs/method/dmtc.yaml)
        projection_hidden=int(cfg.model.get("projection_hidden") or 256),
        head_init=str(cfg.model.get("head_init") or "normal"),
        align_corners=bool(cfg.model.get("align_corners", False)),
    )
    if init == "coco":
        from dmtc.models.checkpoints import load_coco_init

        load_coco_init(model, path)
    model.inputs = {"init": init, **input_normalization(cfg, init)}  # stored in checkpoints
    return model


#: dataset keys that describe the training run's schedule, not the data: not carried into checkpoints
_SCHEDULE_KEYS = ("schedule", "schedules")
#: dataset keys holding paths: made absolute, so a checkpoint's settings work from any working directory
_PATH_KEYS = ("root", "split_dir", "resized_cache_dir")


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
        run_record=run_record(cfg),
    )


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
        if node.get("id") or node.get("version"):
            return {}
        run_id = wandb_run_id(cfg.paths.output_dir, fresh=fresh)
        finish_other_wandb_run(run_id)
        return {"id": run_id, "resume": node.get("resume") or "allow"}
    if issubclass(cls, CSVLogger):
        return {"resume": not fresh}
    return {}


def build_loggers(cfg: DictConfig) -> list[Any]:
    """The configured Lightning loggers, with the composed config logged as hyperparameters.

    Build them once per run: DMT passes the same instances to every phase's Trainer (one W&B run). A rerun
    of the same command continues the same logs: the same W&B run id, the same ``metrics.csv`` (see
    :mod:`dmtc.loggers`); ``overwrite=true`` starts new ones.
    """
    loggers = [instantiate(c, **_resume_kwargs(c, cfg)) for c in (cfg.get("logger") or {}).values() if c is not None]
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
