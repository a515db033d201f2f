"""The LightningModule: one or more segmentation models trained side by side on the same batches.

Supervised training holds one model (``a``); DMT's warm-up and phases hold the pair ``a``/``b``. All models
share one SGD optimizer with one parameter group per (model, part) and one backward of the summed losses,
so Lightning's automatic optimization handles AMP, gradient clipping and DDP, and ``global_step`` counts
batches. The learning rate follows DeepLab's "poly" policy stepped every iteration:
``lr_t = lr · (1 − t / T)^power`` (power 0.9; Chen et al., DeepLab, TPAMI 2017 §4; DMT §4.1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from dmtc.metrics import IGNORE_INDEX, make_miou_metric, summarize

ENSEMBLE = "ens"


def poly_factor(step: int, total_steps: int, power: float = 0.9) -> float:
    """Poly learning-rate factor ``(1 − step / total_steps)^power``, clamped at 0 after the last step."""
    if total_steps <= 0:
        return 1.0
    return max(0.0, 1.0 - step / total_steps) ** power


def upsample_to(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear upsampling of stride-8 logits to label resolution (align_corners=False)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class SegmentationModule(L.LightningModule):
    """Trains the models in ``models`` with cross-entropy on labeled pixels and validates each by mIoU.

    Validation reports ``val/<key>/miou`` (0–100) per model and, with several models, for their ensemble
    (mean of softmaxes) as ``val/ens/miou``; ``val/miou`` is the monitored value (model ``a``).
    ``val_summaries`` keeps the last per-class results for results.json.
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
    ) -> None:
        super().__init__()
        if not models:
            raise ValueError("SegmentationModule needs at least one model")
        self.models = nn.ModuleDict(dict(models))
        self.num_classes, self.class_names = int(num_classes), list(class_names)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.poly_power, self.head_lr_mult = float(poly_power), float(head_lr_mult)
        self.ignore_index = int(ignore_index)
        keys = list(self.models) + ([ENSEMBLE] if len(self.models) > 1 else [])
        self.val_metrics = nn.ModuleDict({k: make_miou_metric(self.num_classes, ignore_index) for k in keys})
        self.val_summaries: dict[str, dict[str, Any]] = {}
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
            }
        )

    @property
    def primary(self) -> str:
        """Key of the model whose mIoU is monitored for checkpointing."""
        return next(iter(self.models))

    def forward(self, images: torch.Tensor, key: str | None = None) -> dict[str, torch.Tensor]:
        """Run model ``key`` (default: the primary model)."""
        return self.models[key or self.primary](images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:  # noqa: D102
        images, labels = batch["image"], batch["label"]
        total = images.new_zeros(())
        for key, model in self.models.items():
            logits = upsample_to(model(images)["logits"], labels.shape[-2:])
            loss = F.cross_entropy(logits, labels, ignore_index=self.ignore_index)
            self.log(f"train/{key}/loss", loss, prog_bar=True, batch_size=images.shape[0])
            total = total + loss
        return total

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:  # noqa: D102
        images, labels = batch["image"], batch["label"]
        probs_sum = None
        for key, model in self.models.items():
            probs = upsample_to(model(images)["logits"], labels.shape[-2:]).float().softmax(1)
            self.val_metrics[key].update(probs.argmax(1), labels)
            probs_sum = probs if probs_sum is None else probs_sum + probs
        if ENSEMBLE in self.val_metrics:
            self.val_metrics[ENSEMBLE].update(probs_sum.argmax(1), labels)

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        for key, metric in self.val_metrics.items():
            with metric.sync_context():
                confmat = metric.confmat.detach().cpu().clone()
            metric.reset()
            summary = summarize(confmat, self.class_names)
            self.val_summaries[key] = summary
            self.log(f"val/{key}/miou", summary["miou"], sync_dist=False)
            for name, iou in summary["per_class_iou"].items():
                if iou is not None:
                    self.log(f"val/{key}/iou/{name}", iou)
        self.log("val/miou", self.val_summaries[self.primary]["miou"], prog_bar=True)

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


class MutualTrainingModule(SegmentationModule):
    """DMT's model pair A/B (Feng et al., Pattern Recognition 2022, §3 and Algorithm 1).

    ``stage="warmup"`` (phase 0): both models learn the labeled batch with cross-entropy.
    ``stage="mutual"`` (phases 1..K): a batch is ``{"labeled": {image, label}, "unlabeled": {image,
    label_a, conf_a, label_b, conf_b}}`` where ``label_x``/``conf_x`` are model x's stored pseudo labels
    (thresholded at load time by the class-balanced curriculum) and confidences. Labeled and unlabeled
    images are concatenated once and each model runs once; A's targets are the ground truth plus **B's**
    pseudo labels (weighted by B's stored confidence in the dynamic mutual loss), B's the ground truth plus
    **A's**. The two losses are summed for one backward, so one optimizer step (with per-model poly
    schedules in the param groups) advances ``global_step`` by one per batch.

    Loss statistics (disagreement rate, current-model-wins rate, mean weight) are logged as tensors:
    no host synchronisation per step. ``step_offset`` shifts the step axis of the loggers so one logger
    run covers all phases without restarting at 0 (Lightning logs at ``_batches_that_stepped``).
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        *,
        stage: str = "warmup",
        gamma1: float = 3.0,
        gamma2: float = 3.0,
        step_offset: int = 0,
        **kwargs: Any,
    ) -> None:
        if set(models) != {"a", "b"}:
            raise ValueError(f"MutualTrainingModule needs models 'a' and 'b', got {sorted(models)}")
        if stage not in ("warmup", "mutual"):
            raise ValueError(f"stage must be 'warmup' or 'mutual', got {stage!r}")
        super().__init__(models, **kwargs)
        self.stage, self.gamma1, self.gamma2 = stage, float(gamma1), float(gamma2)
        self.step_offset = int(step_offset)
        self.hparams.update({"stage": stage, "gamma1": self.gamma1, "gamma2": self.gamma2})

    def on_train_start(self) -> None:  # noqa: D102
        # One continuous logged step axis across phases (W&B needs monotonic steps). On resume the loop
        # state restored from last.ckpt already includes the offset.
        loop = self.trainer.fit_loop.epoch_loop
        loop._batches_that_stepped = max(loop._batches_that_stepped, self.step_offset + self.global_step)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:  # noqa: D102
        if self.stage == "warmup":
            return super().training_step(batch, batch_idx)
        from dmtc.losses.mutual import dynamic_mutual_loss_with_stats

        lab, unl = batch["labeled"], batch["unlabeled"]
        n_lab, n_unl = lab["image"].shape[0], unl["image"].shape[0]
        images = torch.cat([lab["image"], unl["image"]])
        is_pseudo = torch.cat([
            torch.zeros(n_lab, dtype=torch.bool, device=images.device),
            torch.ones(n_unl, dtype=torch.bool, device=images.device),
        ])
        ones = torch.ones_like(lab["label"], dtype=torch.float32)
        total = images.new_zeros(())
        for key, other in (("a", "b"), ("b", "a")):
            labels = torch.cat([lab["label"], unl[f"label_{other}"]])
            confidence = torch.cat([ones, unl[f"conf_{other}"].float()])
            logits = upsample_to(self.models[key](images)["logits"], labels.shape[-2:])
            loss, stats = dynamic_mutual_loss_with_stats(
                logits, labels, confidence, is_pseudo, self.gamma1, self.gamma2, self.ignore_index
            )
            bs = images.shape[0]
            self.log(f"train/{key}/loss", loss, prog_bar=True, batch_size=bs)
            for name, value in stats.items():
                self.log(f"train/{key}/{name}", value, batch_size=bs)
            total = total + loss
        return total
