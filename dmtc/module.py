"""The LightningModule: one or more segmentation models trained side by side.

Supervised training holds one model (``a``); DMT's warm-up and phases hold the pair ``a``/``b``
(:class:`dmtc.dmt.mutual.MutualTrainingModule`). All models
share one SGD optimizer with one parameter group per (model, part) and one backward of the summed losses,
so Lightning's automatic optimization handles AMP, gradient clipping and DDP, and ``global_step`` counts
batches. The learning rate follows DeepLab's "poly" policy stepped every iteration:
``lr_t = lr · (1 − t / T)^power`` (power 0.9; Chen et al., DeepLab, TPAMI 2017 §4; DMT §4.1).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from dmtc.data.layouts import IGNORE_INDEX
from dmtc.metrics import make_miou_metric, predicted_class, summarize
from dmtc.models.deeplab import model_align_corners, upsample_logits

log = logging.getLogger(__name__)

ENSEMBLE = "ens"
CHECKPOINT_KEY = "dmtc"
"""Key of dmtc's metadata in its Lightning checkpoints."""
CHECKPOINT_FORMAT = 1


def poly_factor(step: int, total_steps: int, power: float = 0.9) -> float:
    """Poly learning-rate factor ``(1 − step / total_steps)^power``, clamped at 0 after the last step."""
    if total_steps <= 0:
        return 1.0
    return max(0.0, 1.0 - step / total_steps) ** power


def upsample_to(model: nn.Module, logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear upsampling of ``model``'s stride-8 logits to label resolution, with the model's
    ``align_corners`` (:func:`dmtc.models.upsample_logits`: the one place that decides it)."""
    return upsample_logits(logits, size, align_corners=model_align_corners(model))


class SegmentationModule(L.LightningModule):
    """Trains the models in ``models`` with cross-entropy on labeled pixels and validates each by mIoU.

    A training batch is one labeled batch ``{"image", "label", ...}`` shared by every model, or a batch keyed
    by the model keys, ``{key: batch}``, giving each model its own (DMT's warm-up on two
    difference-maximized subsets, DMT §4.3; independent streams; :meth:`model_batches`); either way one
    optimizer step per batch, so ``global_step`` counts batches.

    ``stacked_inputs``: the images carry one normalised 3-channel block per model, in ``models`` order
    (the models' initialisations need different input pipelines, e.g. DMT's COCO/Caffe A and ImageNet B;
    :class:`dmtc.data.transforms.StackedModelInput`); each model reads its own block (:meth:`model_input`).

    ``run_record`` (the training run's ``dataset`` settings, ``split``, ``sid``: :func:`dmtc.trainer.run_record`)
    is saved with each model's architecture in every checkpoint (:meth:`on_save_checkpoint`).

    Validation reports ``val/<key>/miou`` (0–100) per model and, with several models, for their ensemble
    (mean of softmaxes) as ``val/ens/miou``; ``val/miou`` is the monitored value (model ``a``).
    ``val_summaries`` keeps the last per-class results for results.json.

    **Host synchronisations.** A training or validation step reads nothing back from the device: losses are
    logged as tensors and the confusion matrix is updated on the device
    (:class:`dmtc.metrics.SegmentationJaccardIndex`). What remains, all needed: Lightning turns the logged
    tensors into numbers every ``trainer.log_every_n_steps`` steps (loggers, progress bar); each validation
    copies its confusion matrices to the host once, at its end (the results); with ``16-mixed`` the loss
    scaler reads its inf/NaN flag once per step (``bf16-mixed``, the CUDA default, has no scaler); DMTC's
    ReCo samples from data-dependent sets (:func:`dmtc.losses.reco_sampling.sample_reco`, ~11 per model and
    step) and its memory bank (``bank_size > 0``) selects rows by masks.
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        *,
        num_classes: int,
        class_names: Sequence[str],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        poly_power: float = 0.9,
        head_lr_mult: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        stacked_inputs: bool = False,
        run_record: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not models:
            raise ValueError("SegmentationModule needs at least one model")
        self.models = nn.ModuleDict(dict(models))
        self.stacked_inputs = bool(stacked_inputs)
        self._input_block = {key: i for i, key in enumerate(self.models)}
        self.num_classes, self.class_names = int(num_classes), list(class_names)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.poly_power, self.head_lr_mult = float(poly_power), float(head_lr_mult)
        self.ignore_index = int(ignore_index)
        keys = list(self.models) + ([ENSEMBLE] if len(self.models) > 1 else [])
        self.val_metrics = nn.ModuleDict({k: make_miou_metric(self.num_classes, ignore_index) for k in keys})
        self.val_summaries: dict[str, dict[str, Any]] = {}
        self.run_record = dict(run_record or {})
        self.save_hyperparameters(
            {
                "num_classes": self.num_classes,
                "class_names": self.class_names,
                "models": list(self.models),
                "lr": self.lr,
                "momentum": self.momentum,
                "weight_decay": self.weight_decay,
                "poly_power": self.poly_power,
                "head_lr_mult": self.head_lr_mult,
                "stacked_inputs": self.stacked_inputs,
            }
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record what evaluation and labeling need to rebuild the models without flags (``checkpoint["dmtc"]``,
        :mod:`dmtc.from_checkpoint`): each model's architecture and input pipeline
        (:meth:`dmtc.models.DeepLabV2.architecture`) and the training run's dataset settings and split."""
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "models": {k: m.architecture() for k, m in self.models.items() if hasattr(m, "architecture")},
            **self.run_record,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run trains with the settings of its command, not of the run that saved the checkpoint:
        the restored optimizer and poly schedule get this module's learning rate (the poly factor reached is
        kept), momentum and weight decay. So rerunning a diverged run with a lower ``optim.lr`` (or
        ``method.phase.lr``) continues from its last good checkpoint at the new rate."""
        optimizers, schedulers = checkpoint.get("optimizer_states") or [], checkpoint.get("lr_schedulers") or []
        if len(optimizers) != 1:
            return
        groups = optimizers[0].get("param_groups", [])
        scheduler = schedulers[0] if len(schedulers) == 1 and isinstance(schedulers[0], dict) else {}
        changed = set()
        for i, group in enumerate(groups):
            base = self.lr * (self.head_lr_mult if str(group.get("name", "")).endswith("/head") else 1.0)
            old = float(group.get("initial_lr", group.get("lr", base)))
            if old != base and old > 0:
                changed.add(f"learning rate {old:g} → {base:g}")
                scale = base / old  # the current lr is base · poly factor: keep the factor
                group["lr"], group["initial_lr"] = float(group.get("lr", old)) * scale, base
                for key in ("base_lrs", "_last_lr"):
                    values = scheduler.get(key)
                    if isinstance(values, list) and i < len(values):
                        values[i] = float(values[i]) * scale
            for name, value in (("momentum", self.momentum), ("weight_decay", self.weight_decay)):
                if name in group and float(group[name]) != value:
                    changed.add(f"{name} {float(group[name]):g} → {value:g}")
                    group[name] = value
        if changed:
            log.info("resuming with this command's settings: %s", ", ".join(sorted(changed)))

    @property
    def primary(self) -> str:
        """Key of the model whose mIoU is monitored for checkpointing."""
        return next(iter(self.models))

    def model_input(self, key: str, images: torch.Tensor) -> torch.Tensor:
        """Model ``key``'s view of a batch: ``images`` as they are (3 channels: a shared batch of models with
        one input pipeline, or a per-model batch made with the model's own), or with ``stacked_inputs`` and
        3·(number of models) channels its own 3-channel block (channels ``3i:3i+3`` for the i-th model)."""
        if not self.stacked_inputs or images.shape[1] == 3:
            return images
        expected = 3 * len(self.models)
        if images.shape[1] != expected:
            raise ValueError(f"stacked inputs need {expected} channels (3 per model), got {images.shape[1]}")
        start = 3 * self._input_block[key]
        return images[:, start : start + 3]

    def forward(self, images: torch.Tensor, key: str | None = None) -> dict[str, torch.Tensor]:
        """Run model ``key`` (default: the primary model) on its view of ``images``."""
        key = key or self.primary
        return self.models[key](self.model_input(key, images))

    def model_batches(self, batch: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """``{key: model key's part of the batch}``: ``batch[key]`` when the batch is keyed by exactly the
        model keys (each model its own batch), else the batch itself for every model (shared batches are
        keyed ``image``/``label`` or ``labeled``/``unlabeled``, never by a model key)."""
        if set(batch) == set(self.models):
            return {key: batch[key] for key in self.models}
        if set(batch) & set(self.models):
            raise ValueError(f"a per-model batch needs one batch per model {sorted(self.models)}, got {sorted(batch)}")
        return {key: batch for key in self.models}

    def supervised_loss(self, key: str, part: Mapping[str, torch.Tensor]
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Model ``key``'s cross-entropy on a labeled batch (255 ignored), logged as ``train/<key>/loss``;
        returns ``(loss, raw model output, logits upsampled to the labels, labels)``."""
        images, labels = self.model_input(key, part["image"]), part["label"]
        model = self.models[key]
        out = model(images)
        logits = upsample_to(model, out["logits"], labels.shape[-2:])
        loss = F.cross_entropy(logits, labels, ignore_index=self.ignore_index)
        self.log(f"train/{key}/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss, out, logits, labels

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:  # noqa: D102
        total = None
        for key, part in self.model_batches(batch).items():
            loss = self.supervised_loss(key, part)[0]
            total = loss if total is None else total + loss
        return total

    def predict_probs(self, images: torch.Tensor, size: Sequence[int]) -> dict[str, torch.Tensor]:
        """Each model's class probabilities (softmax of its logits upsampled to ``size``, float32) on its view
        of ``images`` and, with several models, their ensemble ``ens``: the mean of the softmaxes (DMT §4.1
        evaluates the pair's average prediction)."""
        probs = {}
        for key, model in self.models.items():
            logits = model(self.model_input(key, images))["logits"]
            probs[key] = upsample_to(model, logits, size).float().softmax(1)
        if len(probs) > 1:
            probs[ENSEMBLE] = sum(probs.values()) / len(probs)
        return probs

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:  # noqa: D102
        images, labels = batch["image"], batch["label"]
        for key, probs in self.predict_probs(images, labels.shape[-2:]).items():
            self.val_metrics[key].update(predicted_class(probs), labels)

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        # Under DDP the confusion matrix is summed over the processes (each val image is on exactly one:
        # dmtc.data.sharding), so every process computes the same figures; logging them with the "max" of
        # equal values keeps them exact (a mean of three equal floats need not be that float).
        same = {"sync_dist": True, "reduce_fx": "max"}
        for key, metric in self.val_metrics.items():
            with metric.sync_context():
                confmat = metric.confmat.detach().cpu().clone()
            metric.reset()
            summary = summarize(confmat, self.class_names)
            self.val_summaries[key] = summary
            self.log(f"val/{key}/miou", summary["miou"], **same)
            for name, iou in summary["per_class_iou"].items():
                if iou is not None:
                    self.log(f"val/{key}/iou/{name}", iou, **same)
        self.log("val/miou", self.val_summaries[self.primary]["miou"], prog_bar=True, **same)

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD (momentum, weight decay) with per-model backbone/head groups and a per-step poly schedule."""
        groups = []
        for key, model in self.models.items():
            backbone = getattr(model, "backbone", None)
            backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
            body = [p for p in model.parameters() if id(p) in backbone_ids and p.requires_grad]
            head = [p for p in model.parameters() if id(p) not in backbone_ids and p.requires_grad]
            groups.append({"params": body, "lr": self.lr, "name": f"{key}/backbone"})
            groups.append({"params": head, "lr": self.lr * self.head_lr_mult, "name": f"{key}/head"})
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: poly_factor(step, total, self.poly_power)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
