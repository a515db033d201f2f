"""A trains on B's pseudo labels and B on A's: DMT's model pair in one LightningModule (Feng et al.,
Pattern Recognition 2022, §3 and Algorithm 1), with DMTC's contrastive term (:mod:`dmtc.dmt.contrast`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from dmtc.dmt.contrast import contrastive_pixels, contrastive_term, make_banks
from dmtc.losses.mutual import dynamic_mutual_loss_with_stats
from dmtc.module import SegmentationModule, upsample_to
from dmtc.settings import ContrastiveSettings

STAGES = ("warmup", "mutual")


class MutualTrainingModule(SegmentationModule):
    """DMT's model pair A/B.

    ``stage="warmup"`` (phase 0): both models learn the labeled batch with cross-entropy; with
    per-model batches (``{"a": batch, "b": batch}``) each learns its own (``pair_init=subsets``: A on the
    ``-l`` and B on the ``-r`` difference-maximized subset, DMT §4.3; or independent streams).
    ``stage="mutual"`` (phases 1..K): a batch is one stream shared by both models, ``{"labeled": {image,
    label}, "unlabeled": {image, label_a, conf_a, label_b, conf_b}}``, or each
    model its own, ``{"a": stream_a, "b": stream_b}`` (``method.streams=independent``: as the reference's
    two processes, A and B see their own orders, crops and flips; A's unlabeled items need only
    ``label_b``/``conf_b``), where ``label_x``/``conf_x`` are model x's stored pseudo labels (thresholded at
    load time by the class-balanced curriculum) and confidences. A stream's labeled and unlabeled images
    are concatenated once and each model runs once; A's targets are the ground truth plus **B's** pseudo
    labels (weighted by B's stored confidence in the dynamic mutual loss), B's the ground truth plus
    **A's**. The two losses are summed for one backward, so one optimizer step advances ``global_step`` by
    one per batch.

    Loss statistics (disagreement rate, current-model-wins rate, mean weight) are logged as tensors:
    no host synchronisation per step.

    **DMTC** (``contrastive`` given, models with a projection head returning ``"features"``): each model's
    loss gains :func:`~dmtc.dmt.contrast.contrastive_term` on its own features, over the pixels of
    :func:`~dmtc.dmt.contrast.contrastive_pixels`. With ``bank_size > 0`` each model has a memory bank
    (``self.banks[key]``, buffers: saved in checkpoints, moved with the module). The protocol builds a new
    module, hence a fresh bank, per phase: the previous phase's features come from other weights.
    ``train/<key>/contrastive`` and ``train/<key>/bank_fill_mean`` are logged per step (tensors), the
    per-class fill ``train/<key>/bank_fill/<class>`` at each training epoch's end.
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        *,
        stage: str = "warmup",
        gamma1: float = 3.0,
        gamma2: float = 3.0,
        contrastive: ContrastiveSettings | None = None,
        **kwargs: Any,
    ) -> None:
        if set(models) != {"a", "b"}:
            raise ValueError(f"MutualTrainingModule needs models 'a' and 'b', got {sorted(models)}")
        if stage not in STAGES:
            raise ValueError(f"stage must be 'warmup' or 'mutual', got {stage!r}")
        super().__init__(models, **kwargs)
        self.stage, self.gamma1, self.gamma2 = stage, float(gamma1), float(gamma2)
        self.hparams.update({"stage": stage, "gamma1": self.gamma1, "gamma2": self.gamma2})
        self.contrastive = contrastive
        self.banks = nn.ModuleDict()
        if contrastive is not None:
            self.banks.update(make_banks(contrastive, self.models, self.num_classes))
            self.hparams["contrastive"] = asdict(contrastive)

    def _contrast(self, key: str, out: Mapping[str, torch.Tensor], logits: torch.Tensor, labels: torch.Tensor,
                  valid: torch.Tensor) -> torch.Tensor:
        """Model ``key``'s DMTC term (:func:`~dmtc.dmt.contrast.contrastive_term`), its values logged."""
        bank = self.banks[key] if key in self.banks else None
        term, logged = contrastive_term(self.contrastive, self.models[key], out, logits, labels, valid, bank,
                                        self.ignore_index)
        for name, value in logged.items():
            self.log(f"train/{key}/{name}", value, batch_size=labels.shape[0])
        return term

    def on_train_epoch_end(self) -> None:  # noqa: D102
        for key, bank in self.banks.items():
            fill = bank.fill().cpu().tolist()  # one small copy per epoch
            for name, count in zip(self.class_names, fill):
                self.log(f"train/{key}/bank_fill/{name}", float(count), sync_dist=False)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:  # noqa: D102
        parts = self.model_batches(batch)
        if self.stage == "warmup":  # cross-entropy on the labeled batch (+ DMTC's term with gt labels)
            total = None
            for key, part in parts.items():
                loss, out, logits, labels = self.supervised_loss(key, part)
                total = loss if total is None else total + loss
                if self.contrastive is not None:
                    valid = contrastive_pixels(labels, self.contrastive, ignore_index=self.ignore_index)
                    total = total + self._contrast(key, out, logits, labels, valid)
            return total
        joined: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        total = None
        for key, other in (("a", "b"), ("b", "a")):
            stream = parts[key]
            if id(stream) not in joined:  # a shared stream is concatenated once
                joined[id(stream)] = join_labeled_unlabeled(stream["labeled"]["image"], stream["unlabeled"]["image"])
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
            valid = contrastive_pixels(labels, self.contrastive, is_pseudo=is_pseudo, confidence=confidence,
                                       ignore_index=self.ignore_index)
            loss = loss + self._contrast(key, out, logits, labels, valid)
        return loss


def join_labeled_unlabeled(labeled: torch.Tensor, unlabeled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labeled then unlabeled images in one batch (one forward per model), and which rows are pseudo-labeled."""
    images = torch.cat([labeled, unlabeled])
    is_pseudo = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
    is_pseudo[labeled.shape[0]:] = True
    return images, is_pseudo
