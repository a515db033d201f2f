"""The LightningModule: one or more segmentation models trained side by side on the same batches.

Supervised training holds one model (``a``); DMT's warm-up and phases hold the pair ``a``/``b``. All models
share one SGD optimizer with one parameter group per (model, part) and one backward of the summed losses,
so Lightning's automatic optimization handles AMP, gradient clipping and DDP, and ``global_step`` counts
batches. The learning rate follows DeepLab's "poly" policy stepped every iteration:
``lr_t = lr · (1 − t / T)^power`` (power 0.9; Chen et al., DeepLab, TPAMI 2017 §4; DMT §4.1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from dmtc.losses.mutual import dynamic_mutual_loss_with_stats
from dmtc.losses.reco import downsample_nearest, reco_loss
from dmtc.memory_bank import ClassMemoryBank, select_pixels
from dmtc.metrics import IGNORE_INDEX, make_miou_metric, summarize
from dmtc.models.deeplab import model_align_corners, upsample_logits

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


@dataclass(frozen=True)
class ContrastiveSettings:
    """DMTC's regional contrastive term (ReCo, Liu et al., ICLR 2022) for one stage (warm-up or a phase).

    ``weight`` multiplies the loss (DMTC: 1.0 in warm-up, 0.1 in phases; 0 switches the term off).
    ``resolution``: ``"feature"`` (ReCo: labels, validity and the current model's probabilities are resized
    nearest to the stride-8 feature grid) or ``"crop"`` (DMTC's code: features upsampled bilinearly to
    the crop). ``bank_size`` slots per class of a :class:`~dmtc.memory_bank.ClassMemoryBank` per model
    (0: batch-only ReCo), filled with at most ``bank_per_class_per_step`` features per class and step.
    The other fields are :func:`~dmtc.losses.reco.reco_loss`'s arguments; ``weak_threshold`` gates
    pseudo-labeled pixels (see :class:`MutualTrainingModule`).
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


class SegmentationModule(L.LightningModule):
    """Trains the models in ``models`` with cross-entropy on labeled pixels and validates each by mIoU.

    A training batch is one labeled batch ``{"image", "label", ...}`` shared by every model, or
    ``{key: batch}`` giving each model its own (DMT's warm-up on two difference-maximized subsets, DMT
    §4.3); either way one optimizer step per batch, so ``global_step`` counts batches.

    ``stacked_inputs``: the images carry one normalised 3-channel block per model, in ``models`` order
    (the models' initialisations need different input pipelines, e.g. DMT's COCO/Caffe A and ImageNet B;
    :class:`dmtc.builders.StackedModelInput`); each model reads its own block (:meth:`model_input`).

    ``run_record`` (the training run's ``dataset`` settings, ``split``, ``sid``: :func:`dmtc.builders.run_record`)
    is saved with each model's architecture in every checkpoint (:meth:`on_save_checkpoint`).

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

    def auxiliary_loss(
        self, key: str, out: Mapping[str, torch.Tensor], logits: torch.Tensor, labels: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor | None:
        """An extra loss term for model ``key`` added to its segmentation loss; none here (DMTC adds its
        contrastive term). ``out``: the model's raw output; ``logits``: upsampled to the N×H×W ``labels``;
        ``valid``: the pixels allowed to take part."""
        return None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:  # noqa: D102
        per_model = "image" not in batch  # {key: batch}: each model its own labeled batch
        if per_model and set(batch) != set(self.models):
            raise ValueError(f"a per-model batch needs one batch per model {sorted(self.models)}, got {sorted(batch)}")
        total = None
        for key, model in self.models.items():
            part = batch[key] if per_model else batch
            images, labels = self.model_input(key, part["image"]), part["label"]
            valid = labels != self.ignore_index
            if total is None:
                total = images.new_zeros(())
            out = model(images)
            logits = upsample_to(model, out["logits"], labels.shape[-2:])
            loss = F.cross_entropy(logits, labels, ignore_index=self.ignore_index)
            self.log(f"train/{key}/loss", loss, prog_bar=True, batch_size=images.shape[0])
            total = total + loss
            extra = self.auxiliary_loss(key, out, logits, labels, valid)
            if extra is not None:
                total = total + extra
        return total

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:  # noqa: D102
        images, labels = batch["image"], batch["label"]
        probs_sum = None
        for key, model in self.models.items():
            logits = model(self.model_input(key, images))["logits"]
            probs = upsample_to(model, logits, labels.shape[-2:]).float().softmax(1)
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

    ``stage="warmup"`` (phase 0): both models learn the labeled batch with cross-entropy; with
    ``{"a": batch, "b": batch}`` each learns its own (``pair_init=subsets``: A on the ``-l`` and B on the
    ``-r`` difference-maximized subset, DMT §4.3).
    ``stage="mutual"`` (phases 1..K): a batch is one stream shared by both models, ``{"labeled": {image,
    label}, "unlabeled": {image, label_a, conf_a, label_b, conf_b}}``, or each model its own,
    ``{"a": stream_a, "b": stream_b}`` (``method.streams=independent``: as the reference's two processes,
    A and B see their own orders, crops and flips; A's unlabeled items need only ``label_b``/``conf_b``),
    where ``label_x``/``conf_x`` are model x's stored pseudo labels (thresholded at load time by the
    class-balanced curriculum) and confidences. A stream's labeled and unlabeled images are concatenated
    once and each model runs once; A's targets are the ground truth plus **B's** pseudo labels (weighted by
    B's stored confidence in the dynamic mutual loss), B's the ground truth plus **A's**. The two losses
    are summed for one backward, so one optimizer step (with per-model poly
    schedules in the param groups) advances ``global_step`` by one per batch.

    Loss statistics (disagreement rate, current-model-wins rate, mean weight) are logged as tensors:
    no host synchronisation per step. ``step_offset`` shifts the step axis of the loggers so one logger
    run covers all phases without restarting at 0 (Lightning logs at ``_batches_that_stepped``).

    **DMTC** (``contrastive`` given, models with a projection head returning ``"features"``): each model's
    loss gains ``weight · reco_loss`` (ReCo, Liu et al., ICLR 2022) on its own features. Warm-up: labels =
    ground truth, valid = label != 255. Phases: labels = ground truth ++ the *other* model's pseudo labels
    (the same targets as the mutual loss), valid = label != 255 and, on pseudo-labeled images, the other
    model's stored confidence > ``weak_threshold`` (the confidence of the label's source, as ReCo gates its
    pseudo labels by the teacher's confidence). Anchors are hard for the *current* model (its detached
    softmax < ``strong_threshold``). With ``bank_size > 0`` each model has a
    :class:`~dmtc.memory_bank.ClassMemoryBank` (``self.banks[key]``, buffers: saved in checkpoints, moved
    with the module); the loss draws negatives from batch ∪ bank, then the step's valid features are
    enqueued (after the loss, so a batch never meets its own keys; all-gathered across DDP ranks). The
    pipeline builds a new module, hence a fresh bank, per phase: the previous phase's features come from
    other weights. ``train/<key>/contrastive`` and ``train/<key>/bank_fill_mean`` are logged per step
    (tensors), the per-class fill ``train/<key>/bank_fill/<class>`` at each training epoch's end.
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        *,
        stage: str = "warmup",
        gamma1: float = 3.0,
        gamma2: float = 3.0,
        step_offset: int = 0,
        contrastive: ContrastiveSettings | None = None,
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
        self.contrastive = contrastive
        self.banks = nn.ModuleDict()
        if contrastive is not None:
            dims = {k: getattr(m, "projection_dim", None) for k, m in self.models.items()}
            if not all(dims.values()):
                raise ValueError(f"the contrastive term needs models with a projection head; projection_dim: {dims}")
            if contrastive.bank_size > 0 and contrastive.weight > 0:
                self.banks.update({
                    k: ClassMemoryBank(self.num_classes, int(d), contrastive.bank_size) for k, d in dims.items()
                })
            self.hparams["contrastive"] = asdict(contrastive)

    @property
    def contrastive_active(self) -> bool:
        """Whether the contrastive term is computed in this stage (settings given, weight > 0)."""
        return self.contrastive is not None and self.contrastive.weight > 0

    def auxiliary_loss(
        self, key: str, out: Mapping[str, torch.Tensor], logits: torch.Tensor, labels: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor | None:
        """DMTC: ``weight · reco_loss`` for model ``key`` (then its bank is fed), a 0 tied to the features
        when the weight is 0, ``None`` for plain DMT.

        ``out``: the model's output (stride-8 ``logits`` and ``features``); ``logits``: the same upsampled
        to label resolution; ``labels``/``valid``: N×H×W targets and the pixels allowed to take part.
        """
        if self.contrastive is None:
            return None
        features = out["features"]
        settings = self.contrastive
        if not self.contrastive_active:
            # Keeps the projection head in the graph (DDP expects every parameter to get a gradient)
            # while the loss value stays exactly the DMT loss.
            return features.sum() * 0.0
        if settings.resolution == "feature":
            probs_small = out["logits"].detach().float().softmax(1)
            labels_k, valid_k, probs_k = downsample_nearest(labels, valid, probs_small, features.shape[-2:])
        else:  # DMTC's crop-resolution variant
            features = upsample_to(self.models[key], features, labels.shape[-2:])
            labels_k, valid_k, probs_k = labels, valid, logits.detach().float().softmax(1)
        valid_k = valid_k & (labels_k != self.ignore_index)
        labels_k = torch.where(valid_k, labels_k, 0)
        bank = self.banks[key] if key in self.banks else None
        loss = reco_loss(
            features, labels_k, valid_k, probs_k, strong_threshold=settings.strong_threshold,
            temperature=settings.temperature, num_queries=settings.num_queries,
            num_negatives=settings.num_negatives, memory=bank, shared_negatives=settings.shared_negatives,
            bank_prototypes=settings.bank_prototypes, raw_prototypes=settings.raw_prototypes,
        )
        bs = labels.shape[0]
        self.log(f"train/{key}/contrastive", loss.detach(), batch_size=bs)
        if bank is not None:
            bank.enqueue(*select_pixels(features.detach(), labels_k, valid_k),
                         max_per_class=settings.bank_per_class_per_step)
            self.log(f"train/{key}/bank_fill_mean", bank.count.float().mean(), batch_size=bs)
        return settings.weight * loss

    def on_train_epoch_end(self) -> None:  # noqa: D102
        for key, bank in self.banks.items():
            fill = bank.fill().cpu().tolist()  # one small copy per epoch
            for name, count in zip(self.class_names, fill):
                self.log(f"train/{key}/bank_fill/{name}", float(count), sync_dist=False)

    def on_train_start(self) -> None:  # noqa: D102
        # One continuous logged step axis across phases (W&B needs monotonic steps). On resume the loop
        # state restored from last.ckpt already includes the offset.
        loop = self.trainer.fit_loop.epoch_loop
        loop._batches_that_stepped = max(loop._batches_that_stepped, self.step_offset + self.global_step)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:  # noqa: D102
        if self.stage == "warmup":  # cross-entropy on the labeled batch (+ DMTC's term with gt labels)
            return super().training_step(batch, batch_idx)
        # one stream shared by both models ({"labeled", "unlabeled"}) or each model its own ({key: stream})
        streams = {key: batch for key in self.models} if "labeled" in batch else batch
        if set(streams) != set(self.models):
            raise ValueError(f"a per-model phase batch needs one stream per model {sorted(self.models)}, "
                             f"got {sorted(streams)}")
        joined: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        total = None
        for key, other in (("a", "b"), ("b", "a")):
            stream = streams[key]
            if id(stream) not in joined:  # a shared stream is concatenated once
                joined[id(stream)] = _join_labeled_unlabeled(stream["labeled"]["image"], stream["unlabeled"]["image"])
            images, is_pseudo = joined[id(stream)]
            loss = self._mutual_loss(key, other, images, is_pseudo, stream["labeled"], stream["unlabeled"])
            total = loss if total is None else total + loss
        return total

    def _mutual_loss(self, key: str, other: str, images: torch.Tensor, is_pseudo: torch.Tensor,
                     lab: Mapping[str, torch.Tensor], unl: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Model ``key``'s loss on labeled + unlabeled images whose pseudo labels come from model ``other``:
        the dynamic mutual loss (+ DMTC's contrastive term with the same targets)."""
        labels = torch.cat([lab["label"], unl[f"label_{other}"]])
        ones = torch.ones_like(lab["label"], dtype=torch.float32)
        confidence = torch.cat([ones, unl[f"conf_{other}"].float()])
        out = self.models[key](self.model_input(key, images))
        logits = upsample_to(self.models[key], out["logits"], labels.shape[-2:])
        loss, stats = dynamic_mutual_loss_with_stats(
            logits, labels, confidence, is_pseudo, self.gamma1, self.gamma2, self.ignore_index
        )
        bs = images.shape[0]
        self.log(f"train/{key}/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in stats.items():
            self.log(f"train/{key}/{name}", value, batch_size=bs)
        if self.contrastive is not None:
            # Pseudo-labeled pixels take part if their source (the other model) was confident enough.
            pixel_pseudo = is_pseudo.view(-1, 1, 1)
            valid = (labels != self.ignore_index) & (
                ~pixel_pseudo | (confidence > self.contrastive.weak_threshold))
            loss = loss + self.auxiliary_loss(key, out, logits, labels, valid)
        return loss


def _join_labeled_unlabeled(labeled: torch.Tensor, unlabeled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labeled then unlabeled images in one batch (one forward per model), and which rows are pseudo-labeled."""
    images = torch.cat([labeled, unlabeled])
    is_pseudo = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
    is_pseudo[labeled.shape[0]:] = True
    return images, is_pseudo
