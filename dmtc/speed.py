"""Speed knobs that leave CPU results unchanged (README "Speed").

Each knob is decided once, where a run builds its Trainer (:func:`dmtc.trainer.build_trainer`) or, for
``evaluate.py`` / ``pseudo_label.py``, where the task starts:

* **Precision** (``precision=auto``, the default of ``dataset=city|voc``): ``bf16-mixed`` on a CUDA device
  that supports bfloat16 (Ampere and newer), ``16-mixed`` on older CUDA GPUs (with Lightning's loss
  scaler), ``32-true`` on a CPU. Every other value of the ``precision`` group is passed to Lightning as it
  is (:func:`resolve_precision`).
* **TF32** (``cuda.tf32``, default true): float32 matrix products and convolutions on CUDA use TF32 tensor
  cores (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``;
  :func:`configure_cuda`). Float32 layers under AMP (and fp32 runs) get ~3× the throughput of IEEE fp32 at
  a 10-bit mantissa in the products, accumulated in float32. CPU arithmetic is untouched.
* **cuDNN autotuning** (``trainer.benchmark``, Lightning's flag for ``torch.backends.cudnn.benchmark``):
  ``true`` for Cityscapes, whose crops and evaluation size are fixed (one autotuning per shape, then the
  fastest kernels); null (= off) elsewhere: VOC validates and labels full images of many sizes, and each
  new shape would be autotuned again.
* **channels_last** (``model.channels_last``: ``auto`` = on for CUDA, off on a CPU; true/false force it):
  the models' 4-D weights are stored NHWC (:func:`prepare_model`); cuDNN then runs the ResNet and ASPP
  convolutions in NHWC, the layout its tensor-core kernels want under AMP, and every activation follows the
  weights' layout (inputs stay NCHW: the first convolution's output is already NHWC).
* **torch.compile** (``model.compile``, default false): each model is compiled in place
  (``nn.Module.compile``: its parameters and state-dict keys are unchanged, so checkpoints load either
  way). The first steps of each input shape and mode (train / eval) pay the compilation.

Nothing here changes a CPU run with the default settings: on a CPU ``auto`` resolves to ``32-true`` and
channels_last off, and the CUDA flags are not touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

#: Lightning precision names with autocast, and the autocast dtype each means
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}

_CUDA_ACCELERATORS = ("auto", "gpu", "cuda")


def uses_cuda(accelerator: Any = "auto") -> bool:
    """Whether a run with ``trainer.accelerator=accelerator`` computes on a CUDA device: a CUDA device exists
    and the accelerator is ``auto``, ``gpu`` or ``cuda`` (an object, e.g. an accelerator instance, counts as
    its lower-cased class name)."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.replace("Accelerator", "")
    return torch.cuda.is_available() and str(name).lower() in _CUDA_ACCELERATORS


def resolve_precision(precision: Any, accelerator: Any = "auto") -> str:
    """The Lightning precision for ``trainer.precision``: ``auto`` becomes ``bf16-mixed`` on a CUDA device with
    bfloat16 support, ``16-mixed`` on an older CUDA device and ``32-true`` on a CPU; any other value is
    returned as a string, unchanged."""
    value = str(precision)
    if value != "auto":
        return value
    if not uses_cuda(accelerator):
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def autocast_dtype(precision: Any, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of a resolved Lightning ``precision`` on ``device`` (None: no autocast). fp16
    autocast is CUDA only; bf16 autocast runs on CPUs too."""
    dtype = AUTOCAST_DTYPES.get(str(precision))
    if dtype is torch.float16 and torch.device(device).type != "cuda":
        return None
    return dtype


def configure_cuda(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Set the process's CUDA flags from the run's config, when the run computes on CUDA (else nothing):
    TF32 for float32 matmuls and convolutions (``cuda.tf32``, default true) and, when ``trainer.benchmark`` is
    set, ``torch.backends.cudnn.benchmark`` (the Trainer sets it again from the same value: evaluation and
    labeling outside a Trainer see the same setting). Idempotent."""
    trainer = cfg.get("trainer") or {}
    if not uses_cuda(trainer.get("accelerator", "auto")):
        return
    tf32 = bool((cfg.get("cuda") or {}).get("tf32", True))
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    benchmark = trainer.get("benchmark")
    if benchmark is not None and not trainer.get("deterministic", False):
        torch.backends.cudnn.benchmark = bool(benchmark)


def channels_last_wanted(setting: Any, accelerator: Any = "auto") -> bool:
    """``model.channels_last``: ``auto`` (or null) = on when the run computes on CUDA; true/false force it."""
    if setting is None or str(setting).lower() == "auto":
        return uses_cuda(accelerator)
    if isinstance(setting, bool):
        return setting
    text = str(setting).lower()
    if text not in ("true", "false"):
        from dmtc.errors import DMTCError

        raise DMTCError(f"model.channels_last={setting!r}: use auto (on for CUDA), true or false")
    return text == "true"


def compile_options(setting: Any) -> dict[str, Any] | None:
    """``model.compile``: false/null = no compilation (None); true = ``torch.compile``'s defaults (``{}``); a
    mapping = its keyword arguments (``model.compile={mode: max-autotune}``)."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return {}
    if isinstance(setting, Mapping) or hasattr(setting, "items"):
        return dict(setting.items())
    if str(setting).lower() in ("true", "false"):
        return {} if str(setting).lower() == "true" else None
    from dmtc.errors import DMTCError

    raise DMTCError(f"model.compile={setting!r}: use false, true, or torch.compile's options "
                    "(e.g. model.compile={mode:max-autotune})")


def prepare_model(model: nn.Module, *, channels_last: bool = False,
                  compiled: Mapping[str, Any] | None = None) -> nn.Module:
    """``model`` in place and returned: 4-D weights stored channels_last (``channels_last``) and/or compiled
    with ``nn.Module.compile(**compiled)`` (``compiled`` not None: torch.compile's options). Idempotent: a
    model compiled here is not compiled again (DMT's pair serves every phase)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compiled is not None and not getattr(model, "dmtc_compiled", False):
        model.compile(**dict(compiled))
        model.dmtc_compiled = True
    return model


def prepare_models(cfg: DictConfig, models: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """:func:`prepare_model` on each of ``models`` as ``model.channels_last`` and ``model.compile`` say, for the
    run's ``trainer.accelerator``; returns them (the same objects)."""
    node = cfg.get("model") or {}
    accelerator = (cfg.get("trainer") or {}).get("accelerator", "auto")
    layout = channels_last_wanted(node.get("channels_last", "auto"), accelerator)
    options = compile_options(node.get("compile", False))
    return {k: prepare_model(m, channels_last=layout, compiled=options) for k, m in models.items()}
