"""DMTC = DMT + ReCo's regional contrastive term (Liu et al., ICLR 2022) with an optional memory bank:
projection head, config, the term inside MutualTrainingModule, a two-phase run, the bank in checkpoints,
and two DDP ranks (gloo, through train.py) ending with identical banks."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, expect_user_error, tiny_run_overrides

from dmtc.dmt.mutual import MutualTrainingModule
from dmtc.models import deeplab_v2, load_dmt_checkpoint
from dmtc.settings import ContrastiveSettings
from dmtc.tasks.train import train

# Small contrastive sizes keep CPU runs in seconds; the defaults (150 dims, 256 queries, 512 negatives)
# are DMTC's.
SMALL = ["method.contrastive.dim=16", "method.contrastive.num_queries=32", "method.contrastive.num_negatives=64"]
DMTC = ["method=dmtc", "method.ratios=[1.0]", "method.phase.epochs=1", *SMALL]
NUM_CLASSES = 10
NAMES = [f"c{i}" for i in range(NUM_CLASSES)]


class BankDump(L.Callback):
    """Writes ``<out>/rank<r>.pt`` (this rank's memory banks) at the end of every ``fit``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self.out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.banks.state_dict().items()}
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


def _pair(dim: int = 16, hidden: int = 256) -> dict[str, torch.nn.Module]:
    models = {}
    for i, key in enumerate("ab"):
        torch.manual_seed(i)
        models[key] = deeplab_v2(NUM_CLASSES, backbone="resnet_tiny", projection_dim=dim, projection_hidden=hidden)
    return models


def _module(models, stage: str = "mutual", **contrastive) -> MutualTrainingModule:
    settings = None if contrastive.get("off") else ContrastiveSettings(
        **{"num_queries": 32, "num_negatives": 64, **{k: v for k, v in contrastive.items() if k != "off"}})
    return MutualTrainingModule(models, stage=stage, contrastive=settings, num_classes=NUM_CLASSES,
                                class_names=NAMES, lr=0.01)


def _mutual_batch(conf: float, labeled_ignored: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    lab_label = torch.randint(0, NUM_CLASSES, (2, 64, 64), generator=g)
    if labeled_ignored:
        lab_label.fill_(255)
    unl = {"image": torch.randn(2, 3, 64, 64, generator=g)}
    for key in "ab":
        unl[f"label_{key}"] = torch.randint(0, NUM_CLASSES, (2, 64, 64), generator=g)
        unl[f"conf_{key}"] = torch.full((2, 64, 64), conf)
    return {"labeled": {"image": torch.randn(2, 3, 64, 64, generator=g), "label": lab_label}, "unlabeled": unl}


def test_projection_head_adds_features():
    images = torch.randn(2, 3, 64, 64)
    out = deeplab_v2(NUM_CLASSES, backbone="resnet_tiny", projection_dim=24)(images)
    assert out["logits"].shape == (2, NUM_CLASSES, 8, 8) and out["features"].shape == (2, 24, 8, 8)
    model = deeplab_v2(NUM_CLASSES, backbone="resnet_tiny", projection_dim=150)
    assert model.projection_dim == 150 and model(images)["features"].shape == (2, 150, 8, 8)
    assert set(deeplab_v2(NUM_CLASSES, backbone="resnet_tiny")(images)) == {"logits"}
    assert set(model.eval()(images)) == {"logits"}  # validation and labeling do not run the head


def test_dmt_file_loads_into_a_model_with_projection_head(tmp_path):
    """A DMT checkpoint has no projection tensors: they are reported missing (kept), not a backbone error."""
    path = tmp_path / "dmt.pth"
    source = deeplab_v2(NUM_CLASSES, backbone="resnet_tiny")
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = deeplab_v2(NUM_CLASSES, backbone="resnet_tiny", projection_dim=16)
    before = model.projection[0].weight.clone()
    with pytest.warns(UserWarning, match="projection"):
        report = load_dmt_checkpoint(model, path, allow_head_mismatch=False)
    assert report.missing and all(k.startswith("projection.") for k in report.missing)
    assert torch.equal(model.classifier.convs[0].weight, source.classifier.convs[0].weight)
    assert torch.equal(model.projection[0].weight, before)


def test_dmtc_config_composes(compose_cfg):
    cfg = compose_cfg(overrides=["method=dmtc"])
    c = cfg.method.contrastive
    assert cfg.method.name == "dmtc" and cfg.model.projection_dim == 150 and cfg.method.ratios
    assert (c.weight_warmup, c.weight_phase, c.strong_threshold, c.temperature) == (1.0, 0.1, 0.97, 0.5)
    assert (c.num_queries, c.num_negatives, c.resolution, c.bank_size) == (256, 512, "feature", 0)
    assert cfg.method.phase.gamma1 == 3.0  # inherited from dmt
    dmt = compose_cfg(overrides=["method=dmt"])
    assert dmt.model.get("projection_dim") is None and dmt.method.get("contrastive") is None


NO_TRAINER = pytest.mark.filterwarnings("ignore:You are trying to `self.log()`")


def test_bad_contrastive_setting_is_one_message(compose_cfg, capsys):
    cfg = compose_cfg(overrides=[*DMTC, "method.contrastive.resolution=full"])
    expect_user_error(train, cfg, capsys, "method.contrastive", "resolution")
    assert not (Path(cfg.paths.output_dir) / "phase0_warmup").exists()


@NO_TRAINER
def test_weight_zero_is_the_dmt_loss_and_weight_adds_the_term():
    models = _pair()
    batch = _mutual_batch(conf=0.9)
    dmt = _module(models, off=True).training_step(batch, 0)
    zero = _module(models, weight=0.0, bank_size=8).training_step(batch, 0)
    assert torch.equal(dmt, zero)
    torch.manual_seed(0)
    with_term = _module(models, weight=0.1).training_step(batch, 0)
    assert with_term > dmt
    torch.manual_seed(0)
    crop = _module(models, weight=0.1, resolution="crop").training_step(batch, 0)
    assert torch.isfinite(crop) and crop > dmt


@NO_TRAINER
def test_bank_takes_labeled_and_confident_pseudo_pixels_only():
    models = _pair()
    # labeled pixels ignored and the source model's confidence 0.5 < weak 0.7: nothing may take part
    module = _module(models, weight=1.0, bank_size=8, bank_per_class_per_step=4)
    loss = module.training_step(_mutual_batch(conf=0.5, labeled_ignored=True), 0)
    assert all(int(b.count.sum()) == 0 for b in module.banks.values())
    assert torch.isfinite(loss)
    module.training_step(_mutual_batch(conf=0.9, labeled_ignored=True), 0)
    assert all(b.count.tolist() == [4] * NUM_CLASSES for b in module.banks.values())
    # warm-up: ground-truth pixels
    module = _module(models, stage="warmup", weight=1.0, bank_size=8, bank_per_class_per_step=4)
    module.training_step(_mutual_batch(conf=0.9)["labeled"], 0)
    assert all(b.count.tolist() == [4] * NUM_CLASSES for b in module.banks.values())


def test_two_phase_dmtc_run_logs_and_checkpoints_the_bank(compose_cfg):
    cfg = compose_cfg(overrides=[*DMTC, "method.contrastive.bank_size=16", "method.keep_last=true"])
    results = train(cfg)
    run = Path(cfg.paths.output_dir)
    saved = json.loads((run / "results.json").read_text())
    assert saved["method"] == results["method"] == "dmtc"
    assert [p["name"] for p in saved["phases"]] == ["phase0_warmup", "phase1_r1"]
    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    first_class = cfg.dataset.class_names[0]
    for name in ("train/a/contrastive", "train/b/contrastive", "train/a/bank_fill_mean",
                 f"train/b/bank_fill/{first_class}"):
        assert any(r.get(name) not in (None, "") for r in rows), name
    assert any(float(r["train/a/contrastive"]) > 0 for r in rows if r.get("train/a/contrastive"))

    # the bank is in the Lightning checkpoint and round-trips into a fresh module
    ckpt = torch.load(run / "phase1_r1" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert state["banks.a.features"].shape == (NUM_CLASSES, 16, 16) and int(state["banks.a.count"].sum()) > 0
    fresh = _module(_pair(hidden=int(cfg.model.projection_hidden)), weight=0.1, bank_size=16)
    assert int(fresh.banks["a"].count.sum()) == 0
    fresh.load_state_dict(state)
    for key in "ab":
        for name, value in fresh.banks[key].state_dict().items():
            assert torch.equal(value, state[f"banks.{key}.{name}"]), (key, name)


def test_ddp_ranks_end_with_identical_banks(tmp_path):
    """train.py method=dmtc strategy=ddp on 2 CPU processes (gloo): after warm-up and one phase both ranks
    hold the same non-empty banks (enqueue all-gathers), equal to the one in rank 0's last.ckpt."""
    dump = tmp_path / "banks"
    # two phase epochs: the bank in last.ckpt must be the final one even if the last validation does not
    # improve on the best
    overrides = [*tiny_run_overrides(tmp_path), *DMTC, "method.phase.epochs=2", "method.contrastive.bank_size=16",
                 "method.keep_last=true",
                 "strategy=ddp",
                 "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'run'}",
                 "+callbacks.bank_dump._target_=test_dmtc.BankDump", f"+callbacks.bank_dump.out={dump}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert set(ranks[0]) == {f"{k}.{n}" for k in "ab" for n in ("features", "ptr", "count")}
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    assert int(ranks[0]["a.count"].sum()) > 0
    ckpt = torch.load(tmp_path / "run" / "phase1_r1" / "checkpoints" / "last.ckpt", weights_only=True)
    for name, value in ranks[1].items():
        assert torch.equal(value, ckpt["state_dict"][f"banks.{name}"]), name
