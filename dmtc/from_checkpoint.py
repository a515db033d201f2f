"""Evaluation and labeling runs set up from the checkpoint itself: model, input pipeline and dataset.

``python evaluate.py ckpt=X`` and ``python pseudo_label.py ckpt=X`` need no architecture flags:

* **dmtc checkpoints** carry, per model, the architecture and the input pipeline of its initialisation
  (``checkpoint["dmtc"]``, written by :meth:`dmtc.module.SegmentationModule.on_save_checkpoint`: backbone,
  classes, ASPP branches, projection head, head init, ``align_corners``, normalisation of the init, which may
  differ between the two models of a DMT pair) and the training run's dataset settings, split and sid. A
  command-line flag that contradicts the file (``backbone=``, ``backbone.init=``, ``model.aspp_dilations=``,
  ``model.align_corners=``, ``dataset.num_classes=``) is one error; other flags win as usual (``dataset.root=``
  for data that moved, ``dataset=...`` to evaluate on another dataset with the same classes).
* **DMT/DMTC release files** (``{'model': state_dict}`` with ``classifier.0.convs.*``; also Hung et al.'s
  ``layer5.conv2d_list.*`` layout) are the released model: ResNet-101, ASPP d6 + d12 only (the public code
  returns inside its summing loop) and ``align_corners=True``, unless ``model.aspp_dilations`` /
  ``model.align_corners`` are given. Their input pipeline is not in the file: ``backbone.init=coco`` for a
  COCO-initialised model (DMT's A), the default ``imagenet`` otherwise.
* **Other files** (a raw state dict, a dmtc checkpoint from before the metadata): the backbone is read off the
  tensors, the number of ASPP branches off the head; the rest comes from the config. The dataset settings come
  from the training run's ``.hydra/config.yaml`` when the checkpoint sits inside its run folder.

The command line is read from Hydra (``hydra.overrides.task``); nothing here parses ``sys.argv``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from dmtc.errors import DMTCError
from dmtc.models import DeepLabV2, deeplab_v2, load_dmt_checkpoint, model_state, read_checkpoint, release_layout
from dmtc.models.checkpoints import guess_backbone
from dmtc.models.inits import input_normalization
from dmtc.module import CHECKPOINT_KEY

log = logging.getLogger(__name__)

#: the released DMT/DMTC model's branches (the public code sums d6 and d12 only)
RELEASED_DILATIONS = [6, 12]
_ALL_DILATIONS = [6, 12, 18, 24]


@dataclass
class Restored:
    """A model rebuilt from a checkpoint, and the run config that goes with it.

    ``cfg``: the evaluation/labeling config with the checkpoint's dataset settings (and split/sid) where it
    recorded them and the command line did not choose others; ``model``: weights loaded, on the CPU;
    ``inputs``: ``{"mean", "std", "bgr", "value_scale"}`` for :func:`dmtc.data.transforms.build_eval_transform`;
    ``init``: the initialisation that pipeline belongs to; ``kind``: ``dmtc``, ``release`` or ``state_dict``;
    ``model_key``: the model of a pair checkpoint; ``dataset_source``: where the dataset settings came from.
    """

    cfg: DictConfig
    model: DeepLabV2
    inputs: dict[str, Any]
    init: str
    kind: str
    model_key: str | None
    dataset_source: str

    @property
    def architecture(self) -> dict[str, Any]:
        """The rebuilt model's :meth:`~dmtc.models.DeepLabV2.architecture`."""
        return self.model.architecture()


def user_overrides(cfg: DictConfig) -> dict[str, Any]:
    """``{key: value}`` of the command line's overrides (Hydra's ``hydra.overrides.task``; ``+``/``++``
    dropped from keys, deletions ``~key`` mapped to None); ``{}`` outside a Hydra run."""
    if "hydra" in cfg and cfg.hydra.get("overrides") is not None:
        task = list(cfg.hydra.overrides.task)
    elif HydraConfig.initialized():
        task = list(HydraConfig.get().overrides.task)
    else:
        return {}
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(task)
    return {o.key_or_group.lstrip("+"): (None if o.is_delete() else o.value()) for o in parsed}


def _checkpoint_record(contents: object) -> dict[str, Any] | None:
    record = contents.get(CHECKPOINT_KEY) if isinstance(contents, Mapping) else None
    return dict(record) if isinstance(record, Mapping) and record.get("models") else None


def _run_folder_record(ckpt: Path) -> tuple[dict[str, Any], Path] | None:
    """Dataset settings, split and sid of the training run whose folder holds ``ckpt`` (its Hydra record
    ``.hydra/config.yaml``, up to three folders above the file), resolved; None if there is none."""
    for folder in list(ckpt.resolve().parents)[:4]:
        path = folder / ".hydra" / "config.yaml"
        if path.is_file():
            try:
                import dmtc.config  # noqa: F401  (resolvers the saved config uses)

                run = OmegaConf.load(path)
                dataset = OmegaConf.to_container(run.dataset, resolve=True)
            except Exception as err:  # an unreadable record just means: no settings from the run
                log.warning("cannot read the training run's config %s (%s): using the command line's dataset",
                            path, err)
                return None
            for key in ("schedule", "schedules"):
                dataset.pop(key, None)
            return {"dataset": dataset, "split": str(run.get("split")), "sid": int(run.get("sid", 0))}, path
    return None


def _apply_dataset(cfg: DictConfig, record: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """The training run's dataset node (and split/sid) into ``cfg`` unless the command line chose its own,
    then the command line's ``dataset.*`` values on top."""
    recorded = OmegaConf.create(copy.deepcopy(dict(record["dataset"])))
    with open_dict(cfg):
        if recorded.get("name") == cfg.dataset.get("name"):  # the same dataset config: the record's values win
            cfg.dataset = OmegaConf.merge(OmegaConf.to_container(cfg.dataset, resolve=True), recorded)
        else:
            cfg.dataset = recorded
        for key in ("split", "sid"):
            if key not in overrides and record.get(key) is not None:
                cfg[key] = record[key]
        for key, value in overrides.items():
            if key.startswith("dataset."):
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)


def _contradictions(arch: Mapping[str, Any], overrides: Mapping[str, Any], cfg: DictConfig) -> list[str]:
    """Flags on the command line that disagree with the architecture a dmtc checkpoint recorded."""
    found = []
    inputs = arch.get("inputs") or {}
    checks = [
        ("backbone", arch["backbone"]),
        ("backbone.name", arch["backbone"]),
        ("backbone.init", inputs.get("init")),
        ("model.aspp_dilations", list(arch["aspp_dilations"])),
        ("model.align_corners", bool(arch["align_corners"])),
        ("dataset.num_classes", int(arch["num_classes"])),
    ]
    for key, recorded in checks:
        if key not in overrides or recorded is None:
            continue
        given = overrides[key]
        if key == "backbone":  # a group choice: compare the composed backbone's name
            given = cfg.backbone.name
        elif key == "model.aspp_dilations":
            given = [int(v) for v in given]
        elif key == "model.align_corners":
            given = bool(given)
        if given != recorded:
            found.append(f"{key}={overrides[key]} (the checkpoint's: {recorded})")
    return found


def _apply_run_dataset(cfg: DictConfig, ckpt: Path, record: Mapping[str, Any] | None,
                       overrides: Mapping[str, Any]) -> str:
    """Put the training run's dataset settings (recorded in the checkpoint, else its run folder's
    ``.hydra/config.yaml``) into ``cfg`` unless the command line names a dataset; returns where they came from."""
    run = record if record and record.get("dataset") else None
    where = f"recorded in {ckpt.name}"
    if run is None:
        found = _run_folder_record(ckpt)
        if found is not None:
            run, path = found
            where = f"from the training run's {path}"
    if run is None or "dataset" in overrides:
        return "the command line / config"
    _apply_dataset(cfg, run, overrides)
    return f"{run['dataset'].get('name')} settings {where}"


def _recorded_model(cfg: DictConfig, ckpt: Path, record: Mapping[str, Any], model_key: str | None,
                    overrides: Mapping[str, Any]) -> tuple[dict[str, Any], str, dict[str, Any], str]:
    """``(architecture, init, inputs, key)`` of model ``model_key`` (default ``a``) as a dmtc checkpoint
    records it; flags that contradict the record, or a dataset with another class count, are one error."""
    models = record["models"]
    key = model_key if model_key is not None else ("a" if "a" in models else next(iter(models)))
    if key not in models:
        raise DMTCError(f"checkpoint {ckpt} has no model {key!r} (model_key=); it holds models {sorted(models)}")
    arch = dict(models[key])
    bad = _contradictions(arch, overrides, cfg)
    if bad:
        raise DMTCError(
            f"checkpoint {ckpt} records its model ({arch['backbone']}, {arch['num_classes']} classes, ASPP "
            f"{arch['aspp_dilations']}, align_corners {arch['align_corners']}, inputs of init "
            f"{(arch.get('inputs') or {}).get('init')}), but the command line says {'; '.join(bad)}: drop "
            "those flags (dmtc checkpoints carry their architecture and input pipeline)"
        )
    if int(arch["num_classes"]) != int(cfg.dataset.num_classes):
        raise DMTCError(
            f"checkpoint {ckpt} predicts {arch['num_classes']} classes but dataset={cfg.dataset.name} has "
            f"{cfg.dataset.num_classes}: evaluate it on the dataset it was trained on (leave dataset= out to "
            "use the one it records)"
        )
    inputs = dict(arch.get("inputs") or {})
    init = str(inputs.pop("init", None) or cfg.backbone.get("init", "none"))
    if not inputs:
        inputs = input_normalization(cfg, init=init)
    return arch, init, inputs, key


def _guessed_model(cfg: DictConfig, ckpt: Path, contents: object, model_key: str | None,
                   overrides: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """``(architecture, released)`` of a file without dmtc's record, read off its tensors: a DMT/DMTC
    release file is the released d6 + d12 model with ``align_corners=True`` unless flags say otherwise;
    another state dict keeps the config's head, with as many ASPP branches as the file holds."""
    state = model_state(contents, ckpt, model_key)
    released = release_layout(contents, ckpt)
    backbone = str(cfg.backbone.name)
    if "backbone" not in overrides and "backbone.name" not in overrides:
        backbone = guess_backbone(state) or backbone
    branches = len({k.split(".")[2] for k in state if k.startswith("classifier.convs.")})
    if "model.aspp_dilations" in overrides:
        dilations = [int(v) for v in cfg.model.aspp_dilations]
    elif released:
        dilations = list(RELEASED_DILATIONS)
    else:
        dilations = [int(v) for v in cfg.model.aspp_dilations]
        if branches and branches != len(dilations) and branches <= len(_ALL_DILATIONS):
            dilations = _ALL_DILATIONS[:branches]
    corners = bool(cfg.model.get("align_corners", False))
    if released and "model.align_corners" not in overrides:
        corners = True
    return {"backbone": backbone, "num_classes": int(cfg.dataset.num_classes), "aspp_dilations": dilations,
            "align_corners": corners}, released


def restore(cfg: DictConfig, ckpt: str | Path, model_key: str | None = None) -> Restored:
    """Rebuild model ``model_key`` of checkpoint ``ckpt`` (see the module docstring for what comes from the
    file and what from the config); returns the model with its weights and the config to evaluate it with."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise DMTCError(f"checkpoint {ckpt} (ckpt=) does not exist")
    contents = read_checkpoint(ckpt)
    overrides = user_overrides(cfg)
    cfg = copy.deepcopy(cfg)
    record = _checkpoint_record(contents)
    dataset_source = _apply_run_dataset(cfg, ckpt, record, overrides)
    if record is not None:
        arch, init, inputs, key = _recorded_model(cfg, ckpt, record, model_key, overrides)
        kind = "dmtc"
    else:
        arch, released = _guessed_model(cfg, ckpt, contents, model_key, overrides)
        init = str(cfg.backbone.get("init", "none"))
        inputs = input_normalization(cfg, init=init)
        kind, key = ("release" if released else "state_dict"), model_key

    model = deeplab_v2(int(arch["num_classes"]), backbone=str(arch["backbone"]),
                       aspp_dilations=tuple(arch["aspp_dilations"]), align_corners=bool(arch["align_corners"]))
    model.inputs = {"init": init, **inputs}
    report = load_dmt_checkpoint(model, ckpt, model_key=model_key, allow_head_mismatch=False, contents=contents)
    with open_dict(cfg):
        cfg.backbone.name = str(arch["backbone"])
    what = {"dmtc": "dmtc checkpoint", "release": "DMT/DMTC release file",
            "state_dict": "state dict"}[kind]
    log.info("%s %s%s: %s, %d classes, ASPP %s, align_corners %s, inputs of init %s (%d tensors loaded); dataset: %s",
             what, ckpt, f" model {key}" if key else "", arch["backbone"], arch["num_classes"],
             list(arch["aspp_dilations"]), arch["align_corners"], init, len(report.loaded), dataset_source)
    return Restored(cfg=cfg, model=model, inputs=dict(inputs), init=init, kind=kind, model_key=key,
                    dataset_source=dataset_source)
