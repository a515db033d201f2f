"""Shared fixtures: a tiny synthetic dataset on disk and Hydra configs composed against tmp folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import dmtc.config  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# A synthetic set small enough for tests: 40 train / 10 val images of 64×64.
TINY_SPEC = {"image_size": 64, "num_train": 40, "num_val": 10}
TINY_OVERRIDES = [f"dataset.generate.spec.{k}={v}" for k, v in TINY_SPEC.items()]


def tiny_run_overrides(tmp: Path, synthetic: bool = True) -> list[str]:
    """Overrides that make a CPU run of the real entry points take seconds, writing only under ``tmp``."""
    overrides = [
        "method=supervised",  # the default is DMTC; tests that want it say method=dmt/dmtc (the last wins)
        "debug=smoke",
        f"paths.cache_dir={tmp / 'cache'}",
        f"paths.log_dir={tmp / 'outputs'}",
        "dataset.val_batch_size=5",
        "dataset.unlabeled_max_images=null",  # the tiny sets are small already; smoke's own cap: test_smoke.py
    ]
    return overrides + (TINY_OVERRIDES if synthetic else [])


@pytest.fixture
def compose_cfg(tmp_path: Path):
    """Compose a config like the entry point would (with Hydra's runtime set), output under tmp_path."""

    def _compose(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
        overrides = list(overrides or [])
        synthetic = not any(o.startswith("dataset=") for o in overrides)
        with initialize_config_dir(str(CONFIGS), version_base="1.3"):
            cfg = compose(config_name, overrides=tiny_run_overrides(tmp_path, synthetic) + overrides,
                          return_hydra_config=True)
        out = tmp_path / "run"
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(out)
        HydraConfig.instance().set_config(cfg)
        out.mkdir(parents=True, exist_ok=True)
        return cfg

    return _compose


def run_script(script: str, args: list[str], cwd: Path, timeout: int = 300):
    """Run an entry point (train.py / evaluate.py) as a user would, in a subprocess."""
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def expect_user_error(fn, cfg, capsys, *fragments: str) -> str:
    """Call ``fn(cfg)`` as the entry points do; it must exit 1 with one ``error:`` line holding ``fragments``."""
    from dmtc.cli import run_entry

    with pytest.raises(SystemExit) as exc:
        run_entry(fn, cfg)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err
