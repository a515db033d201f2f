"""Loading DMT/DMTC checkpoints and dmtc's own Lightning checkpoints into a :class:`DeepLabV2`.

Accepted files (read with ``torch.load(weights_only=True)`` on the CPU):

- DMT/DMTC files (Feng et al., Pattern Recognition 2022, public code): ``{'model': state_dict, 'optimizer':
  ..., 'lr_scheduler': ...}`` with keys ``backbone.<torchvision resnet key>`` and
  ``classifier.0.convs.{i}.{weight,bias}``; a ``module.`` (DataParallel) prefix is tolerated.
- a raw state dict in any of the key layouts below (including the AdvSemiSeg/Hung et al. COCO DeepLab-v2
  file, whose keys are torchvision's plus ``layer5.conv2d_list.{i}``);
- dmtc Lightning checkpoints ``{'state_dict': {...}}`` whose models sit under ``models.<key>.``.

File keys are mapped onto the model's own names: ``backbone.*`` (torchvision names) and
``classifier.convs.{i}.*``.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dmtc.errors import DMTCError

log = logging.getLogger(__name__)

_TORCHVISION_TOP = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.", "fc.")
# DataParallel / torch.compile wrappers, and ``Scale.`` of the Caffe-converted DeepLab-v2 files
# (``MS_DeepLab_resnet_pretrained_COCO_init.pth`` style) that AdvSemiSeg's file derives from
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "Scale.")

#: Public origin of the COCO-pretrained DeepLab-v2 ResNet-101 (Hung et al., AdvSemiSeg release) that DMT,
#: DMTC and ClassMix start from; DMT's ``convert_coco_resnet101.py`` turns it into ``city_coco_resnet101.pt``
#: / ``voc_coco_resnet101.pt`` (DMT's README). Either file is accepted by :func:`load_coco_init`.
COCO_INIT_URL = "http://vllab1.ucmerced.edu/~whung/adv-semi-seg/resnet101COCO-41f33a49.pth"


@dataclass
class LoadReport:
    """What :func:`load_dmt_checkpoint` did.

    ``loaded``: model keys filled from the file. ``skipped``: model keys whose file tensor has another
    shape (e.g. a 21-class head into a 19-class model); they keep their current values. ``unused``: file
    keys (as written in the file) the model has no place for (e.g. the d18/d24 convs when the model has two
    branches). ``missing``: model keys the file lacks (they keep their current values).
    """

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _read(path: Path) -> object:
    if not path.is_file():
        raise DMTCError(f"Checkpoint file {str(path)!r} not found.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure means the file is unusable
        raise DMTCError(
            f"Could not read checkpoint {str(path)!r} with torch.load(weights_only=True): {e}. It is not a "
            "PyTorch checkpoint, is damaged, or pickles Python objects other than tensors and plain "
            "containers."
        ) from e


def read_checkpoint(path: str | Path) -> object:
    """The object stored in a checkpoint file (``torch.load(weights_only=True)`` on the CPU); a missing or
    unreadable file is one :class:`DMTCError`."""
    return _read(Path(path))


def model_state(contents: object, path: str | Path, model_key: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the one model a checkpoint holds (``model_key`` of a pair), keyed by dmtc's module
    names (``backbone.*``, ``classifier.convs.{i}.*``, ``projection.*``) whatever the file's layout."""
    raw, prefix = _select_state_dict(contents, Path(path), model_key)
    return {_map_key(k[len(prefix):]): v for k, v in raw.items()}


def release_layout(contents: object, path: str | Path) -> bool:
    """Whether a file holds a model in the released DMT/DMTC/AdvSemiSeg key layout (``classifier.0.convs.*``
    or ``layer5.conv2d_list.*``): models whose public code sums only the d6 and d12 branches."""
    try:
        raw, prefix = _select_state_dict(contents, Path(path), None)
    except DMTCError:
        return False
    return any(_strip_wrappers(k[len(prefix):]).startswith(("classifier.0.convs.", "layer5.conv2d_list."))
               for k in raw)


def _is_state_dict(obj: object) -> bool:
    """A str-keyed mapping holding tensors (non-tensor extra states are allowed and ignored)."""
    return (
        isinstance(obj, Mapping)
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _select_state_dict(obj: object, path: Path, model_key: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """Return the tensors of the one model the file holds (original keys) and their common key prefix."""
    if isinstance(obj, Mapping) and _is_state_dict(obj.get("state_dict")):
        state = obj["state_dict"]  # Lightning
    elif isinstance(obj, Mapping) and _is_state_dict(obj.get("model")):
        state = obj["model"]  # DMT / DMTC
    elif _is_state_dict(obj):
        state = obj
    else:
        raise DMTCError(
            f"{str(path)!r} is not a model checkpoint: expected a state dict, a DMT file "
            "{'model': state_dict, ...} or a Lightning file {'state_dict': ...}."
        )
    keys = sorted({m.group(1) for k in state if (m := re.match(r"models\.([^.]+)\.", k))})
    if keys:  # a dmtc module holding several models under models.<key>.
        if model_key is None:
            if "a" in keys:
                model_key = "a"
            elif len(keys) == 1:
                model_key = keys[0]
            else:
                raise DMTCError(f"Checkpoint {str(path)!r} holds models {keys}; choose one with model_key.")
        if model_key not in keys:
            raise DMTCError(f"Checkpoint {str(path)!r} has no model {model_key!r}; it holds models {keys}.")
        prefix = f"models.{model_key}."
    elif model_key is not None:
        raise DMTCError(
            f"model_key={model_key!r} was given but checkpoint {str(path)!r} holds a single model; "
            "leave model_key unset."
        )
    elif all(k.startswith("model.") for k in state):  # a Lightning module holding one model as `model`
        prefix = "model."
    else:
        prefix = ""
    return {k: v for k, v in state.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}, prefix


def _strip_wrappers(key: str) -> str:
    """``key`` without DataParallel / torch.compile / Caffe-conversion prefixes."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _map_key(key: str) -> str:
    """Map one model-level file key to dmtc's module names."""
    key = _strip_wrappers(key)
    if key.startswith("classifier.0.convs."):  # DMT: classifier = Sequential(ASPP)
        return "classifier.convs." + key[len("classifier.0.convs.") :]
    if key.startswith("layer5.conv2d_list."):  # AdvSemiSeg / Hung et al. COCO DeepLab-v2
        return "classifier.convs." + key[len("layer5.conv2d_list.") :]
    if key.startswith(_TORCHVISION_TOP):  # a bare torchvision-style ResNet
        return "backbone." + key
    return key


def guess_backbone(state: Mapping[str, torch.Tensor]) -> str | None:
    """Name the backbone a (dmtc-keyed) state dict seems to hold, from its block layout; None if unclear."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
    if not blocks:
        return None
    n3 = max(blocks) + 1
    bottleneck = any(k.startswith("backbone.layer3.0.conv3.") for k in state)
    stem = state.get("backbone.conv1.weight")
    if bottleneck:
        return {6: "resnet50", 23: "resnet101", 36: "resnet152"}.get(n3)
    if stem is not None and stem.shape[0] == 16 and n3 == 1:
        return "resnet_tiny"
    return {2: "resnet18", 6: "resnet34"}.get(n3)


def _check_backbone(model: nn.Module, own: Mapping[str, torch.Tensor], file_state: Mapping[str, torch.Tensor],
                    missing: list[str], path: Path) -> None:
    """One DMTCError when the file's backbone does not fit the model's (tensors missing or of other shapes),
    naming the backbone the file seems to hold."""
    backbone_bad = [
        k for k in own if k.startswith("backbone.") and k in file_state and file_state[k].shape != own[k].shape
    ]
    backbone_missing = [
        k for k in missing if k.startswith("backbone.") and not k.endswith(".num_batches_tracked")
    ]
    if backbone_bad or backbone_missing:
        own_name = getattr(model, "backbone_name", None) or guess_backbone(own) or "this model's backbone"
        file_name = guess_backbone(file_state)
        seems = f" The file seems to hold a {file_name} backbone." if file_name else ""
        detail = backbone_missing[:3] if backbone_missing else backbone_bad[:3]
        what = "lacks" if backbone_missing else "has other shapes for"
        count = len(backbone_missing) if backbone_missing else len(backbone_bad)
        raise DMTCError(
            f"Checkpoint {str(path)!r} does not fit a {own_name} model: it {what} {count} backbone tensors "
            f"(e.g. {', '.join(detail)}).{seems} Choose the backbone the checkpoint was trained with."
        )


def _head_problems(own: Mapping[str, torch.Tensor], file_state: Mapping[str, torch.Tensor], report: LoadReport,
                   path: Path, allow_head_mismatch: bool) -> list[str]:
    """Warnings about head tensors the file does not fit (another class count: a DMTCError unless
    ``allow_head_mismatch``) or lacks."""
    problems = []
    if report.skipped:
        head_weights = [k for k in report.skipped if k.startswith("classifier.") and k.endswith(".weight")]
        if head_weights:
            file_classes = file_state[head_weights[0]].shape[0]
            model_classes = own[head_weights[0]].shape[0]
            problem = f"Checkpoint {str(path)!r} has {file_classes} classes but the model has {model_classes}"
        else:
            problem = f"Checkpoint {str(path)!r} has tensors of other shapes than the model's head"
        if not allow_head_mismatch:
            raise DMTCError(
                f"{problem} ({', '.join(report.skipped)}). Set the dataset / num_classes to the "
                "checkpoint's classes, or allow a head mismatch to load the backbone only."
            )
        problems.append(f"{problem}; not loaded (initial values kept): {', '.join(report.skipped)}")
    head_missing = [k for k in report.missing if not k.startswith("backbone.")]
    if head_missing:
        problems.append(
            f"Checkpoint {str(path)!r} lacks {len(head_missing)} model tensors (initial values kept): "
            f"{', '.join(head_missing)}"
        )
    return problems


def load_dmt_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    model_key: str | None = None,
    allow_head_mismatch: bool = True,
    contents: object | None = None,
) -> LoadReport:
    """Load a DMT/DMTC checkpoint or a dmtc Lightning checkpoint into ``model`` (a :class:`DeepLabV2`).

    ``model_key`` picks the model of a Lightning checkpoint (``models.<key>.``; default ``a`` if present,
    else the only one). Non-backbone tensors whose shape does not fit (another class count) are skipped
    with one warning if ``allow_head_mismatch``, else raise :class:`DMTCError`. Backbone tensors that are
    missing or do not fit raise :class:`DMTCError`. Model keys absent from the file, other than the
    backbone's, keep their values and are warned about. ``contents``: the file's object when the caller has
    read it already (:func:`read_checkpoint`), so a large file is not read twice.
    """
    path = Path(path)
    raw, prefix = _select_state_dict(_read(path) if contents is None else contents, path, model_key)
    file_state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in raw.items():
        mapped = _map_key(key[len(prefix) :])
        file_state[mapped] = value
        origin[mapped] = key

    own = model.state_dict()
    report = LoadReport()
    report.unused = sorted(origin[k] for k in file_state if k not in own)
    report.missing = sorted(k for k in own if k not in file_state)
    _check_backbone(model, own, file_state, report.missing, path)

    state_to_load = {}
    for key, value in file_state.items():
        if key not in own:
            continue
        if value.shape != own[key].shape:
            report.skipped.append(key)
        else:
            report.loaded.append(key)
            state_to_load[key] = value
    report.loaded.sort()
    report.skipped.sort()
    if not report.loaded:
        raise DMTCError(f"Checkpoint {str(path)!r} has no tensor that fits this model.")

    problems = _head_problems(own, file_state, report, path, allow_head_mismatch)
    if problems:
        warnings.warn(". ".join(problems) + ".", stacklevel=2)
    model.load_state_dict(state_to_load, strict=False)
    return report


def load_coco_init(model: nn.Module, path: str | Path) -> LoadReport:
    """Initialise ``model`` (a resnet101 :class:`DeepLabV2`) from COCO-pretrained DeepLab-v2 weights.

    Accepts DMT's converted file (``{'model': state_dict}`` with ``backbone.*`` / ``classifier.0.convs.*``,
    e.g. ``city_coco_resnet101.pt``) or the original ``resnet101COCO-41f33a49.pth`` of Hung et al.
    (torchvision-named ResNet keys, optionally under ``Scale.``, plus ``layer5.conv2d_list.{i}``), converted
    on the fly exactly as DMT's ``convert_coco_resnet101.py`` does: ResNet keys → ``backbone.*``, ASPP
    branches → ``classifier.convs.{i}``. Like DMT, the Caffe ResNet-101 (stride in the first 1×1 conv of a
    block) is loaded into torchvision's v1.5 layout (stride in the 3×3 conv); shapes are identical.
    The COCO head (21 outputs) is loaded when the model has 21 classes (VOC, as DMT's ``voc_coco`` file);
    for another class count it keeps its random initialisation. ASPP branches the model lacks are unused.

    A missing file raises :class:`DMTCError` naming the path and where to get the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DMTCError(
            f"COCO init weights file {str(path)!r} not found (backbone.init=coco). Download Hung et al.'s "
            f"COCO-pretrained DeepLab-v2 {COCO_INIT_URL} (converted on load) or use DMT's converted "
            "city_coco_resnet101.pt / voc_coco_resnet101.pt (DMT's README, convert_coco_resnet101.py), and put "
            "it there or set backbone.weights to it."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the head mismatch (19 vs 21 classes) is expected and reported below
        report = load_dmt_checkpoint(model, path, allow_head_mismatch=True)
    head = "kept random (other class count)" if report.skipped else "loaded"
    log.info("COCO init from %s: %d tensors loaded, classifier %s", path, len(report.loaded), head)
    return report
