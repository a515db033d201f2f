"""Typed settings: the parts of the composed Hydra config the training code reads, checked once.

The entry tasks (:mod:`dmtc.tasks`) hold the ``DictConfig``; the method's code below them takes these
frozen dataclasses. Each is read from its config node by field name (:func:`from_node`: no field is copied
by hand, an unknown key is an error naming it), so a knob has one name: the config key is the field.
The YAML files (``configs/``) are the home of the protocol's values; the dataclass defaults, for Python
callers, equal them (``tests/test_configs.py`` checks it).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from dmtc.errors import DMTCError

T = TypeVar("T")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the field's type (``int``, ``float``, ``bool``, ``str`` or their ``| None``)."""
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if base in (int, float, str, bool):
        if base is bool and not isinstance(value, bool):
            raise DMTCError(f"{key}={value!r} must be true or false")
        try:
            return base(value)
        except (TypeError, ValueError) as err:
            raise DMTCError(f"{key}={value!r} is not a {base.__name__}") from err
    return value


def from_node(cls: type[T], node: DictConfig | Mapping[str, Any] | None, prefix: str,
              ignore: tuple[str, ...] = (), **values: Any) -> T:
    """``cls`` from the config node at ``prefix`` (e.g. ``method.contrastive``): every key of the node is a
    field (or listed in ``ignore``: keys other code reads), ``values`` override; a missing key takes the
    field's default. A wrong type or an unknown key is one :class:`DMTCError` naming ``prefix.key``."""
    data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known - set(ignore) - set(values))
    if unknown:
        raise DMTCError(f"unknown key(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; known: {sorted(known)}")
    data = {k: v for k, v in data.items() if k in known}
    data.update(values)
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise DMTCError(f"{prefix}: {err}") from err


def defaults_of(cls: type) -> dict[str, Any]:
    """The dataclass's default values by field name (fields without one are left out)."""
    return {f.name: f.default for f in fields(cls) if f.default is not dataclasses.MISSING}


@dataclass(frozen=True)
class OptimSettings:
    """SGD with momentum and weight decay, learning rate on DeepLab's poly schedule
    ``lr_t = lr · (1 − t / T)^poly_power`` (Chen et al., DeepLab, TPAMI 2017 §4; DMT §4.1): ``optim.*``.
    ``head_lr_mult`` scales the learning rate of everything outside the backbone."""

    lr: float = 0.004
    momentum: float = 0.9
    weight_decay: float = 0.0005
    poly_power: float = 0.9
    head_lr_mult: float = 1.0


@dataclass(frozen=True)
class PhaseSettings:
    """One DMT phase's schedule (Feng et al., Pattern Recognition 2022, §4.1): ``method.phase.*``.

    ``epochs`` passes over the unlabeled set (capped at ``max_steps`` batches, -1: none) with a fresh SGD
    at ``lr`` on the poly schedule; batches of ``labeled_batch_size`` labeled + ``unlabeled_batch_size``
    pseudo-labeled images; the dynamic mutual loss with ``gamma1``/``gamma2``; validation every
    ``val_check_interval`` steps (None: once per epoch) and after the last step."""

    epochs: int = 10
    max_steps: int = -1
    lr: float = 0.004
    gamma1: float = 3.0
    gamma2: float = 3.0
    labeled_batch_size: int = 2
    unlabeled_batch_size: int = 6
    val_check_interval: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.labeled_batch_size < 1 or self.unlabeled_batch_size < 1:
            raise ValueError(f"epochs and batch sizes must be >= 1: {self}")


@dataclass(frozen=True)
class ContrastiveSettings:
    """DMTC's regional contrastive term (ReCo, Liu et al., ICLR 2022) for one stage (warm-up or a phase):
    ``method.contrastive.*`` (``configs/method/dmtc.yaml`` documents every key).

    ``weight`` multiplies the loss (DMTC: ``weight_warmup`` 1.0 in warm-up, ``weight_phase`` 0.1 in phases;
    0 switches the term off). ``resolution``: ``"feature"`` (ReCo: labels, validity and the current model's
    probabilities are resized nearest to the stride-8 feature grid) or ``"crop"`` (DMTC's code: features
    upsampled bilinearly to the crop). ``bank_size`` slots per class of a
    :class:`~dmtc.dmt.bank.ClassMemoryBank` per model (0: batch-only ReCo), filled with at most
    ``bank_per_class_per_step`` features per class and step. The other fields are
    :func:`~dmtc.losses.reco.reco_loss`'s arguments; ``weak_threshold`` gates pseudo-labeled pixels
    (:func:`dmtc.dmt.contrast.contrastive_pixels`).
    """

    weight: float = 1.0
    strong_threshold: float = 0.97
    weak_threshold: float = 0.7
    temperature: float = 0.5
    num_queries: int = 256
    num_negatives: int = 512
    shared_negatives: bool = True
    resolution: str = "feature"
    bank_size: int = 0
    bank_per_class_per_step: int = 64
    bank_prototypes: bool = False
    raw_prototypes: bool = False

    def __post_init__(self) -> None:
        if self.resolution not in ("feature", "crop"):
            raise ValueError(f"contrastive resolution must be 'feature' or 'crop', got {self.resolution!r}")
        if self.weight < 0 or self.bank_size < 0 or self.bank_per_class_per_step < 0:
            raise ValueError(f"contrastive weight, bank_size and bank_per_class_per_step must be >= 0: {self}")

    @property
    def active(self) -> bool:
        """Whether the term is computed (weight > 0)."""
        return self.weight > 0


#: keys of ``method.contrastive`` read elsewhere: the per-stage weights and the projection head's size
CONTRASTIVE_STAGE_KEYS = ("weight_warmup", "weight_phase", "dim", "hidden")


def optim_settings(cfg: DictConfig, lr: float | None = None) -> OptimSettings:
    """``optim.*`` (``lr`` replaces ``optim.lr``: a DMT phase's own learning rate)."""
    extra = {} if lr is None else {"lr": lr}
    return from_node(OptimSettings, cfg.optim, "optim", **extra)


def phase_settings(cfg: DictConfig) -> PhaseSettings:
    """``method.phase.*`` of a DMT method."""
    return from_node(PhaseSettings, cfg.method.phase, "method.phase")


def contrastive_settings(cfg: DictConfig, warmup: bool) -> ContrastiveSettings | None:
    """DMTC's contrastive term for the warm-up (``warmup=True``) or a phase from ``method.contrastive`` (None
    for ``method=dmt``): weight ``weight_warmup`` in phase 0, ``weight_phase`` in DMT phases."""
    node = cfg.method.get("contrastive")
    if node is None:
        return None
    weight = node.get("weight_warmup" if warmup else "weight_phase")
    return from_node(ContrastiveSettings, node, "method.contrastive", ignore=CONTRASTIVE_STAGE_KEYS,
                     weight=weight)
