"""The algorithm's behaviours, each checked by what it does, on models that learned something.

End-to-end runs use ``LEARNABLE``: a synthetic spec (big objects, exact class hues, no clutter) and schedule
on which the smoke-sized network learns several classes in a few seconds, so that A vs B, ensemble,
train-vs-evaluate and resume comparisons carry meaning. Every test states the one-line mistake it is there to
catch; ``benchmarks/mutation_check.py`` plants those mistakes and reruns the suite.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import probes
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, LEARNABLE, SPEC, tiny_run_overrides
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from dmtc.dmt.mutual import MutualTrainingModule
from dmtc.losses.mutual import dynamic_mutual_loss
from dmtc.metrics import make_miou_metric
from dmtc.models import deeplab_v2, load_dmt_checkpoint
from dmtc.module import ENSEMBLE, SegmentationModule
from dmtc.tasks.evaluate import evaluate
from dmtc.tasks.train import train

PAIR = ["method.ratios=[0.5,1.0]", "method.phase.epochs=1", "method.phase.lr=0.02"]
SMALL_DMTC = ["method.contrastive.dim=16", "method.contrastive.num_queries=32", "method.contrastive.num_negatives=64"]
PROBE = "+callbacks.probe._target_=probes.TrainerProbe"


def _compose(tmp: Path, config: str, *overrides: str):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose(config, overrides=[*tiny_run_overrides(tmp, synthetic=False), *overrides],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp / f"run_{config}")
    HydraConfig.instance().set_config(cfg)
    Path(cfg.hydra.runtime.output_dir).mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """One DMTC run (warm-up + phases r = 0.5, 1.0) on the learnable task, with the probe's records."""
    tmp = tmp_path_factory.mktemp("learned")
    probes.RECORDS.clear()
    cfg = _compose(tmp, "train", "method=dmtc", *LEARNABLE, *PAIR, *SMALL_DMTC, PROBE)
    results = train(cfg)
    return {"results": results, "records": list(probes.RECORDS), "tmp": tmp, "run": Path(cfg.paths.output_dir)}


def _learned_classes(summary: dict) -> int:
    return sum(1 for v in summary["per_class_iou"].values() if v)


def test_models_learn_several_classes_and_differ(learned):
    results = learned["results"]
    for phase in results["phases"]:
        for key in ("a", "b", ENSEMBLE):
            assert _learned_classes(phase["val"][key]) >= 2, (phase["name"], key)
    final = results["phases"][-1]["val"]
    assert final["a"]["miou"] != final["b"]["miou"]  # two different models: comparisons below mean something


def test_evaluate_each_model_of_the_pair_as_the_run_recorded(learned):
    # mistakes caught: evaluate.py ignoring model_key; a phase re-validating B with A's weights
    results = learned["results"]
    final = results["phases"][-1]
    for key in "ab":
        cfg = _compose(learned["tmp"] / key, "evaluate", f"ckpt={final['checkpoints'][key]}", f"model_key={key}")
        evaluated = evaluate(cfg)
        assert evaluated["miou"] == pytest.approx(final["val"][key]["miou"], abs=1e-3), key
        assert evaluated["per_class_iou"] == pytest.approx(final["val"][key]["per_class_iou"], abs=1e-3)


def test_each_phase_starts_from_each_models_own_best_weights(learned):
    # mistakes caught: carrying A's best weights into B (or the other way), skipping the reload
    records, phases = learned["records"], learned["results"]["phases"]
    assert [r["stage"] for r in records] == ["warmup", "mutual", "mutual"]
    for record, previous in zip(records[1:], phases[:-1]):
        for key in "ab":
            best = deeplab_v2(10, backbone="resnet_tiny", projection_dim=16, projection_hidden=64)
            load_dmt_checkpoint(best, previous["checkpoints"][key], model_key=key, allow_head_mismatch=False)
            for name, value in best.state_dict().items():
                assert torch.equal(record["weights"][key][name], value), (previous["name"], key, name)
    first = records[1]["weights"]
    assert not torch.equal(first["a"]["classifier.convs.0.weight"], first["b"]["classifier.convs.0.weight"])


def test_dmtc_weight_per_stage(learned):
    # mistake caught: DMTC's phase weight 0.1 ignored (1.0 everywhere)
    assert [r["contrastive_weight"] for r in learned["records"]] == [1.0, 0.1, 0.1]


def test_learning_rate_follows_poly_in_every_phase(learned):
    # mistake caught: a constant learning rate (or a schedule over the wrong number of steps)
    results = learned["results"]
    with open(learned["run"] / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-SGD/a/backbone")]
    by_step = {int(r["step"]): float(r["lr-SGD/a/backbone"]) for r in rows}
    for phase, lr in zip(results["phases"], (0.05, 0.02, 0.02)):
        start, total = sum(p["steps"] for p in results["phases"][: phase["phase"]]), phase["steps"]
        checked = 0
        for t in range(total):
            if start + t in by_step:
                assert by_step[start + t] == pytest.approx(lr * (1 - t / total) ** 0.9, rel=1e-6), (phase["name"], t)
                checked += 1
        assert checked >= total - 1, phase["name"]


def test_pair_resumes_with_the_finished_phases_weights(tmp_path):
    """Rerun after a phase: the pair restarts the next phase from the finished phase's best weights (read back
    from its checkpoints), not from the warm-up or a fresh init."""
    # mistake caught: on resume, the finished phase's weights not loaded back into the pair
    overrides = ["method=dmt", *LEARNABLE, *PAIR, PROBE, "method.keep_last=false"]
    probes.RECORDS.clear()
    cfg = _compose(tmp_path, "train", *overrides)
    results = train(cfg)
    run = Path(cfg.paths.output_dir)
    (run / "results.json").unlink()
    (run / "phase2_r1" / "done.json").unlink()  # phase 2 must run again; phases 0 and 1 are finished
    probes.RECORDS.clear()
    rerun = train(_compose(tmp_path, "train", *overrides))
    assert [r["stage"] for r in probes.RECORDS] == ["mutual"]  # only phase 2 was trained
    phase1 = results["phases"][1]
    for key in "ab":
        best = deeplab_v2(10, backbone="resnet_tiny")
        load_dmt_checkpoint(best, phase1["checkpoints"][key], model_key=key, allow_head_mismatch=False)
        for name, value in best.state_dict().items():
            assert torch.equal(probes.RECORDS[0]["weights"][key][name], value), (key, name)
    assert rerun["phases"][1]["val"] == results["phases"][1]["val"]


def _fixed_pair() -> dict[str, torch.nn.Module]:
    models = {}
    for seed, key in enumerate("ab"):
        torch.manual_seed(seed)
        model = deeplab_v2(4, backbone="resnet_tiny")
        for conv in model.classifier.convs:
            torch.nn.init.normal_(conv.weight, std=0.5)
        models[key] = model.eval()
    return models


def test_ensemble_is_the_mean_of_the_softmaxes():
    # mistake caught: the ensemble's prediction taken from one model
    models = _fixed_pair()
    module = MutualTrainingModule(models, num_classes=4, class_names=list("wxyz"), lr=0.1).eval()
    torch.manual_seed(5)
    images, labels = torch.randn(3, 3, 24, 32), torch.randint(0, 4, (3, 24, 32))
    with torch.no_grad():
        module.validation_step({"image": images, "label": labels}, 0)
        probs = {k: F.interpolate(m(images)["logits"], size=(24, 32), mode="bilinear").softmax(1)
                 for k, m in models.items()}
    for key, pred in (("a", probs["a"].argmax(1)), ("b", probs["b"].argmax(1)),
                      (ENSEMBLE, (probs["a"] + probs["b"]).argmax(1))):
        ref = make_miou_metric(4)
        ref.update(pred, labels)
        assert torch.equal(module.val_metrics[key].confmat, ref.confmat), key
    assert not torch.equal(module.val_metrics[ENSEMBLE].confmat, module.val_metrics["b"].confmat)
    assert not torch.equal(module.val_metrics[ENSEMBLE].confmat, module.val_metrics["a"].confmat)


def test_mutual_step_trains_each_model_on_the_others_labels():
    """A's targets are B's stored pseudo labels and B's are A's: with B's labels all ignored, A's loss is the
    loss of its labeled images alone (normalised by the labeled pixels)."""
    # mistake caught: self-training (A on its own labels, B on its own)
    models = _fixed_pair()
    module = MutualTrainingModule(models, stage="mutual", gamma1=3.0, gamma2=3.0, num_classes=4,
                                  class_names=list("wxyz"), lr=0.1)
    torch.manual_seed(2)
    lab = {"image": torch.randn(2, 3, 24, 32), "label": torch.randint(0, 4, (2, 24, 32))}
    unl = {"image": torch.randn(3, 3, 24, 32), "label_a": torch.randint(0, 4, (3, 24, 32)),
           "conf_a": torch.rand(3, 24, 32), "label_b": torch.full((3, 24, 32), 255), "conf_b": torch.rand(3, 24, 32)}
    images = torch.cat([lab["image"], unl["image"]])
    is_pseudo = torch.tensor([False, False, True, True, True])

    def loss_of(key: str, labels: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(models[key](images)["logits"], size=(24, 32), mode="bilinear")
        full_conf = torch.cat([torch.ones(2, 24, 32), conf])
        return dynamic_mutual_loss(logits, torch.cat([lab["label"], labels]), full_conf, is_pseudo, 3.0, 3.0)

    with torch.no_grad():
        total = module.training_step({"labeled": lab, "unlabeled": unl}, 0)
        loss_a = loss_of("a", unl["label_b"], unl["conf_b"])
        loss_b = loss_of("b", unl["label_a"], unl["conf_a"])
        labeled_only = F.cross_entropy(F.interpolate(models["a"](lab["image"])["logits"], size=(24, 32),
                                                     mode="bilinear"), lab["label"])
    assert torch.allclose(loss_a, labeled_only, atol=1e-6)  # B's labels all ignored: only the labeled part
    assert torch.allclose(total, loss_a + loss_b, atol=1e-5)
    self_training = loss_of("a", unl["label_a"], unl["conf_a"]) + loss_of("b", unl["label_b"], unl["conf_b"])
    assert not torch.allclose(total, self_training, atol=1e-3)
    # the same with each model's own stream
    with torch.no_grad():
        per_model = module.training_step({"a": {"labeled": lab, "unlabeled": unl},
                                          "b": {"labeled": lab, "unlabeled": unl}}, 0)
    assert torch.allclose(per_model, total, atol=1e-6)


def test_trainer_uses_the_configured_precision(tmp_path):
    # mistake caught: precision forced to 32-true
    probes.RECORDS.clear()
    cfg = _compose(tmp_path, "train", "precision=bf16-mixed", "split=1", PROBE,
                   *(f"dataset.generate.spec.{k}={v}" for k, v in SPEC.items()))
    train(cfg)
    assert [r["precision"] for r in probes.RECORDS] == ["bf16-mixed"]


def test_segmentation_module_single_model_targets():
    """Supervised training: the loss is cross-entropy of the upsampled logits (no pseudo labels)."""
    models = _fixed_pair()
    module = SegmentationModule({"a": models["a"]}, num_classes=4, class_names=list("wxyz"), lr=0.1)
    torch.manual_seed(4)
    batch = {"image": torch.randn(2, 3, 24, 32), "label": torch.randint(0, 4, (2, 24, 32))}
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        ref = F.cross_entropy(F.interpolate(models["a"](batch["image"])["logits"], size=(24, 32), mode="bilinear"),
                              batch["label"])
    assert torch.allclose(loss, ref, atol=1e-6)


def test_ddp_runs_two_ranks(tmp_path):
    """strategy=ddp trainer.devices=2 really trains on two processes (each rank reports world size 2), and
    only rank 0 keeps the logs: one W&B run id file, one offline W&B run, one metrics.csv."""
    # mistake caught: build_trainer forced to one device
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "probe"
    run = tmp_path / "ddp_run"
    overrides = [*tiny_run_overrides(tmp_path), "split=1", "strategy=ddp", "trainer.accelerator=cpu",
                 "trainer.devices=2", f"hydra.run.dir={run}", PROBE, f"+callbacks.probe.out={out}", "logger=csv_wandb"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = sorted(json.loads(p.read_text())["global_rank"] for p in out.glob("rank*_fit0.json"))
    assert seen == [0, 1]
    assert all(json.loads(p.read_text())["world_size"] == 2 for p in out.glob("*.json"))
    (offline,) = (run / "wandb").glob("offline-run-*")  # rank 1 started no W&B run of its own
    assert offline.name.endswith("-" + (run / "wandb_run_id").read_text().strip())
    assert [p.name for p in run.rglob("metrics.csv")] == ["metrics.csv"]
