"""Every option of every config group composes, for both entry points."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import dmtc.config  # noqa: F401

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name != "hydra")


def _options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("config_name", ["train", "evaluate"])
@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(config_name, group):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        for option in _options(group):
            cfg = compose(config_name, overrides=[f"{group}={option}"], return_hydra_config=True)
            assert cfg.hydra.run.dir
            assert cfg.backbone.name and cfg.dataset.name and cfg.trainer._target_


def test_dataset_picks_its_backbone_and_command_line_wins():
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        assert compose("train").backbone.name == "resnet_tiny"  # synthetic default: CPU-sized
        assert compose("train", overrides=["dataset=folder"]).backbone.name == "resnet101"
        assert compose("train", overrides=["backbone=resnet50"]).backbone.name == "resnet50"
        assert compose("train", overrides=["dataset=folder", "debug=smoke"]).backbone.name == "resnet_tiny"


def test_projection_head_width_follows_the_backbone():
    """DMTC's head: 3×3 conv F→hidden (256 on ResNet-101, as DMTC; 64 on resnet_tiny) → 1×1 → 150."""
    from dmtc.models.inits import build_model

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        tiny = compose("train", overrides=["method=dmtc"])
        r101 = compose("train", overrides=["method=dmtc", "backbone=resnet101", "backbone.init=none"])
        wide = compose("train", overrides=["method=dmtc", "method.contrastive.hidden=32"])
    assert (r101.model.projection_dim, r101.model.projection_hidden) == (150, 256)
    assert (tiny.model.projection_hidden, wide.model.projection_hidden) == (64, 32)
    convs = [m for m in build_model(tiny).projection.modules() if m.__class__.__name__ == "Conv2d"]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(128, 64), (64, 150)]


def test_precision_and_strategy_land_in_trainer():
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["precision=bf16-mixed", "strategy=ddp"])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.strategy == "ddp"


def test_same_command_same_run_folder():
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        a = compose("train", overrides=["split=4", "sid=1"], return_hydra_config=True)
    assert a.hydra.job.override_dirname == "sid-1_split-4"


def test_unknown_group_option_is_a_hydra_error():
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="dataset"):
            compose("train", overrides=["dataset=nope"])


def test_synthetic_config_spec_matches_generator_defaults():
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from dmtc.data.synthetic import SYNTHETIC_CLASSES, SyntheticSpec

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train")
    spec = OmegaConf.to_container(cfg.dataset.generate.spec)
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(SyntheticSpec()).items()}
    assert spec == defaults
    assert list(cfg.dataset.class_names) == list(SYNTHETIC_CLASSES)
    assert cfg.dataset.num_classes == len(SYNTHETIC_CLASSES)


def test_run_name_is_safe_and_bounded():
    from dmtc.config import run_name

    assert run_name("") == "default"
    assert run_name("model.aspp_dilations-[6,12]_split-8") == "model.aspp_dilations-_6_12__split-8"
    assert run_name("x-/a/b=c") == "x-_a_b_c"
    long_a, long_b = "x=" + "a" * 300, "x=" + "a" * 299 + "b"
    assert len(run_name(long_a)) == 120 and run_name(long_a) != run_name(long_b)
