"""Backbone initialisations: which weights a model starts from and which inputs it then expects.

DMT (Feng et al., Pattern Recognition 2022, §4.1) starts models from ImageNet-pretrained ResNets or from
DeepLab-v2 weights pretrained on COCO (Hung et al.'s Caffe conversion), and its pair may mix the two (A
COCO, B ImageNet). Each init has its own input pipeline (:data:`INIT_INPUTS`); a model built here records
its init and pipeline in ``model.inputs`` (saved in dmtc checkpoints), so evaluation and labeling feed it
the inputs it was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dmtc.errors import DMTCError
from dmtc.models.deeplab import DeepLabV2, deeplab_v2

#: Input pipeline of each backbone initialisation (DESIGN §3, DMT §4.1): torchvision ImageNet weights
#: expect RGB in [0, 1] with ImageNet mean/std; the COCO DeepLab-v2 weights (Caffe) expect BGR in 0–255
#: minus the Caffe mean, std 1. Random init (``none``) uses the ImageNet pipeline.
INIT_INPUTS: dict[str, dict[str, Any]] = {
    "imagenet": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "bgr": False, "value_scale": 1 / 255},
    "coco": {"mean": [104.008, 116.669, 122.675], "std": [1.0, 1.0, 1.0], "bgr": True, "value_scale": 1.0},
    "none": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "bgr": False, "value_scale": 1 / 255},
}


INITS: tuple[str, ...] = tuple(INIT_INPUTS)


def check_init(init: str) -> str:
    """``init`` if it is a known initialisation, else one DMTCError listing them."""
    if init not in INIT_INPUTS:
        raise DMTCError(f"backbone.init={init!r} is not an initialisation; use one of {', '.join(INITS)}")
    return init


def input_normalization(cfg: DictConfig, init: str | None = None) -> dict[str, Any]:
    """Input pipeline (mean, std, channel order, value scale) of initialisation ``init`` (default
    ``backbone.init``): :data:`INIT_INPUTS`, with any non-null ``backbone.input`` field overriding it when
    ``init`` is the config's own. So ``backbone.init=coco`` alone switches inputs to Caffe BGR 0–255."""
    own = str(cfg.backbone.get("init", "none"))
    init = check_init(own if init is None else str(init))
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


def configured_weights(cfg: DictConfig, init: str) -> str | None:
    """``backbone.weights`` for the config's own init, else ``backbone.weight_files.<init>`` (or None)."""
    own = str(cfg.backbone.get("init", "none"))
    path = cfg.backbone.get("weights") if init == own else (cfg.backbone.get("weight_files") or {}).get(init)
    return str(path) if path else None


def init_weights_path(cfg: DictConfig, init: str | None = None) -> str | None:
    """Weight file of initialisation ``init`` (default ``backbone.init``): ``backbone.weights`` for the
    config's own init, else ``backbone.weight_files.<init>``; ``None`` for ``none``."""
    own = str(cfg.backbone.get("init", "none"))
    init = check_init(own if init is None else str(init))
    if init == "none":
        return None
    path = configured_weights(cfg, init)
    if not path:
        raise DMTCError(
            f"backbone.init={init} needs a weight file but backbone {cfg.backbone.name} has none configured: set "
            f"backbone.weights (or backbone.weight_files.{init}) to the file, or use backbone.init=none"
        )
    return str(path)


def build_model(cfg: DictConfig, init: str | None = None) -> DeepLabV2:
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
    init = check_init(str(cfg.backbone.get("init", "none")) if init is None else str(init))
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


def init_available(cfg: DictConfig, init: str) -> bool:
    """Whether initialisation ``init`` can build the configured backbone: ``none`` always, ``coco`` and
    ``imagenet`` when the backbone config names a weight file for it (resnet_tiny names none)."""
    return init == "none" or configured_weights(cfg, init) is not None
