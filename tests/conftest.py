"""Shared fixtures: a tiny synthetic dataset on disk and Hydra configs composed against tmp folders."""

from __future__ import annotations

import os
import sys
import time
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


# A synthetic task the smoke-sized network learns in seconds (big objects, exact class hues, no clutter):
# 60 steps of batch 8 (6 at split 8) reach 6+ classes with IoU > 0, so comparisons between models mean
# something (tests/test_regressions.py).
SPEC = {"image_size": 48, "num_train": 48, "num_val": 8, "objects": "[2,3]", "object_radius": "[0.2,0.3]",
        "hue_jitter": 0, "distractors": "[0,0]", "plain_shapes": "[0,0]", "noise_sigma": 0, "blur_sigma": 0,
        "gradient": 0, "background_texture": 0}
LEARNABLE = [*(f"dataset.generate.spec.{k}={v}" for k, v in SPEC.items()), "dataset.crop_size=[48,48]",
             "dataset.batch_size=8", "trainer.limit_train_batches=null", "trainer.limit_val_batches=null",
             "trainer.max_steps=60", "trainer.max_epochs=-1", "optim.lr=0.05", "dataset.val_batch_size=8"]


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


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a W&B offline transaction log ``run-<id>.wandb``: a 7-byte header (``:W&B``,
    magic, version), then leveldb-style 32 KiB blocks of chunks (crc32, uint16 length, type: 1 full, 2
    first, 3 middle, 4 last). Tests read what a run logged with it (the SDK has no Python reader)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # no room for a chunk header: the rest of the block is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_wandb_records(run_dir: Path, timeout: float = 120.0) -> list:
    """The records of an offline W&B run once its log holds the exit record: W&B's service process may still
    be writing the file when the training process has exited."""
    deadline = time.monotonic() + timeout
    while True:
        logs = list(run_dir.glob("run-*.wandb"))
        records = read_wandb_records(logs[0]) if logs else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_history(run_dir: Path) -> list[dict]:
    """``{key: value}`` of every history record of an offline W&B run folder (Lightning's WandbLogger logs
    its step as ``trainer/global_step``)."""
    import json as _json

    (log,) = Path(run_dir).glob("run-*.wandb")
    rows = []
    for record in read_wandb_records(log):
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            row = {(item.key or "/".join(item.nested_key)): _json.loads(item.value_json) for item in items}
            rows.append(row)
    return rows
