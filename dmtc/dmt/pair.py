"""How DMT's models A and B differ, and which images each sees (Feng et al., Pattern Recognition 2022,
§4.1 and §4.3).

Two models that start alike would label alike and teach each other nothing; DMT makes them differ by
``method.pair_init``: two seeds, two initialisations (A from COCO-pretrained DeepLab-v2, B from ImageNet) or
two difference-maximized labeled subsets for their warm-ups. ``method.streams`` decides whether they also
see their own shuffled, augmented data stream (as the reference's two training processes) or share batches.
"""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from dmtc.data.build import build_layout
from dmtc.data.split_resolver import Split, resolve_split
from dmtc.data.splits import DMS_SPLITS, parse_split
from dmtc.errors import DMTCError
from dmtc.models.inits import INITS, build_model, init_available

log = logging.getLogger(__name__)

PAIR = ("a", "b")
"""The keys of DMT's two models, A and B, everywhere (checkpoints, logs, results)."""

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
    models = m.get("models") or {}
    inits = _pair_inits(cfg, mode, models)
    if cfg.get("smoke") and any(not init_available(cfg, inits[k]) for k in PAIR):
        mode, inits = _smoke_pair(cfg, mode, inits)
    if mode == "inits" and inits["a"] == inits["b"]:
        raise DMTCError(f"pair_init=inits needs two different inits, but A and B both use {inits['a']}: set "
                        "method.models.a.init / method.models.b.init (e.g. coco and imagenet), or use "
                        "method.pair_init=seeds for one init under two seeds")
    warmup = _warmup_split_names(cfg, models) if mode == "subsets" else None
    return PairSpec(mode, dict(zip(PAIR, seeds)), inits, warmup)


def _pair_inits(cfg: DictConfig, mode: str, models: DictConfig | dict) -> dict[str, str]:
    """Each model's init: ``method.models.<k>.init`` (``inits``/``subsets``; null = ``backbone.init``) or
    ``backbone.init`` (``seeds``), each checked to be an initialisation."""
    own = str(cfg.backbone.get("init", "none"))
    inits = {}
    for key in PAIR:
        init = (models.get(key) or {}).get("init") if mode != "seeds" else None
        init = own if init is None else str(init)
        if init not in INITS:
            raise DMTCError(f"method.models.{key}.init={init!r} (model {key.upper()}, pair_init={mode}) is not an "
                            f"initialisation: use one of {', '.join(INITS)}, or null for backbone.init ({own})")
        inits[key] = init
    return inits


def _smoke_pair(cfg: DictConfig, mode: str, inits: dict[str, str]) -> tuple[str, dict[str, str]]:
    """``debug=smoke`` shrinks the backbone; the dataset's pair (e.g. city's COCO A + ImageNet B) needs weight
    files of the full ResNet-101: the smoke pair becomes two seeds of the backbone's own init (or ``none``)."""
    own = str(cfg.backbone.get("init", "none"))
    fallback = own if init_available(cfg, own) else "none"
    log.info("debug=smoke: the pair's inits (A %s, B %s) need weight files backbone=%s lacks; the smoke run "
             "uses pair_init=%s with init %s for both", inits["a"], inits["b"], cfg.backbone.name,
             "subsets" if mode == "subsets" else "seeds", fallback)
    return ("seeds" if mode == "inits" else mode), {k: fallback for k in PAIR}


def _warmup_split_names(cfg: DictConfig, models: DictConfig | dict) -> dict[str, str]:
    """``pair_init=subsets``: each model's warm-up split name, ``method.models.<k>.labeled`` or DMT's
    difference-maximized ``<split>-l`` (A) / ``<split>-r`` (B); the two must differ."""
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
    return warmup


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
    sampling, :func:`dmtc.data.split_resolver.resolve_split`), each a subset of the run's labeled split."""
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
