"""Evaluate a checkpoint: `python evaluate.py ckpt=PATH [dataset=...] [backbone=...]` (see README.md)."""

import hydra
from omegaconf import DictConfig

import dmtc.config  # noqa: F401  (registers OmegaConf resolvers used by the configs)
from dmtc.cli import run_entry
from dmtc.tasks.evaluate import evaluate


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the mIoU."""
    return run_entry(evaluate, cfg)["miou"]


if __name__ == "__main__":
    main()
