"""Typed settings: read from their config node by field name, one home per value, clear errors."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from dmtc.dmt.phases import Phase
from dmtc.dmt.protocol import stage_schedule
from dmtc.errors import DMTCError
from dmtc.loggers import CSVLogger, StepOffsetLogger
from dmtc.settings import (
    ContrastiveSettings,
    OptimSettings,
    PhaseSettings,
    contrastive_settings,
    defaults_of,
    optim_settings,
    phase_settings,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_dataclass_defaults_equal_the_yaml_values():
    """The YAML files are the home of the protocol's values; the Python defaults must not drift from them."""
    dmtc_yaml = OmegaConf.load(CONFIGS / "method" / "dmtc.yaml").method.contrastive
    contrastive = defaults_of(ContrastiveSettings)
    assert contrastive.pop("weight") == dmtc_yaml.weight_warmup
    assert contrastive == {k: dmtc_yaml[k] for k in contrastive}
    train_yaml = OmegaConf.load(CONFIGS / "train.yaml")
    assert defaults_of(OptimSettings) == OmegaConf.to_container(train_yaml.optim)


def test_phase_defaults_equal_the_method_yaml_for_a_dataset_without_a_schedule(compose_cfg):
    """``method.phase.*`` falls back to dmt.yaml's values when the dataset has no DMT schedule (folder)."""
    cfg = compose_cfg(overrides=["method=dmt", "dataset=folder"])
    assert "schedule" not in cfg.dataset
    assert phase_settings(cfg) == PhaseSettings()


def test_settings_come_from_the_composed_config(compose_cfg):
    cfg = compose_cfg(overrides=["method=dmtc", "method.contrastive.temperature=0.2", "method.phase.gamma1=5",
                                 "optim.momentum=0.8"])
    warm, phase = contrastive_settings(cfg, warmup=True), contrastive_settings(cfg, warmup=False)
    assert (warm.weight, phase.weight) == (1.0, 0.1) and warm.temperature == phase.temperature == 0.2
    assert phase_settings(cfg).gamma1 == 5.0 and isinstance(phase_settings(cfg).epochs, int)
    assert optim_settings(cfg).momentum == 0.8 and optim_settings(cfg, lr=0.5).lr == 0.5
    assert contrastive_settings(compose_cfg(overrides=["method=dmt"]), warmup=True) is None


@pytest.mark.parametrize(("override", "fragment"), [
    ("+method.contrastive.temprature=0.3", "method.contrastive.temprature"),
    ("method.contrastive.num_queries=many", "method.contrastive.num_queries='many' is not a int"),
    ("method.contrastive.shared_negatives=3", "method.contrastive.shared_negatives=3 must be true or false"),
    ("method.contrastive.resolution=pixel", "resolution must be 'feature' or 'crop'"),
])
def test_a_bad_contrastive_key_is_one_error_naming_it(compose_cfg, override, fragment):
    cfg = compose_cfg(overrides=["method=dmtc", override])
    with pytest.raises(DMTCError, match=re.escape(fragment)):
        contrastive_settings(cfg, warmup=False)


class _Constant(L.LightningModule):
    """A one-parameter model whose logged loss is its step: enough to see the step axis of a log."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.log("loss", float(self.global_step))
        return (self.w * batch).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_step_offset_logger_puts_consecutive_trainers_on_one_step_axis(tmp_path):
    """Two fits (two Trainers, each counting from 0) log into one metrics.csv at steps 0..2 and 3..5."""
    csv_logger = CSVLogger(tmp_path)
    data = torch.utils.data.DataLoader(torch.ones(3, 1), batch_size=1)
    for offset in (0, 3):
        trainer = L.Trainer(max_steps=3, logger=StepOffsetLogger(csv_logger, offset), log_every_n_steps=1,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(_Constant(), data)
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r["loss"]]
    assert rows == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 0.0), (4, 1.0), (5, 2.0)]


@pytest.mark.parametrize(("overrides", "expected"), [
    # the synthetic default: 700 unlabeled // 6 = 116 batches, 2 epochs = 232 > the cap 150
    ([], (-1, 150)),
    (["method.phase.max_steps=-1"], (2, -1)),
    (["method.phase.max_steps=400"], (2, -1)),               # 232 steps end first
    (["trainer.limit_train_batches=50"], (2, -1)),           # 2 x 50 = 100 <= 150
    (["trainer.limit_train_batches=0.5"], (2, -1)),          # 2 x int(116 x 0.5) = 116
    (["trainer.limit_train_batches=0.9"], (-1, 150)),        # 2 x 104 = 208
    (["method.phase.epochs=1"], (1, -1)),                    # 116 steps end first
])
def test_a_phase_gives_the_trainer_only_the_limit_that_ends_it(compose_cfg, overrides, expected):
    """max_epochs and max_steps are never both finite for a DMT phase (Lightning 2.6 resumes an end-of-epoch
    checkpoint of such a fit as finished): the one that is reached first, counting batches as Lightning does."""
    cfg = compose_cfg(overrides=["method=dmt", "trainer.limit_train_batches=null", *overrides])
    phase = Phase(index=1, ratio=0.2)
    schedule = stage_schedule(cfg, phase, unlabeled_images=700)
    assert (schedule["max_epochs"], schedule["max_steps"]) == expected
    assert stage_schedule(cfg, Phase(index=0, ratio=None), 700) == {}
