"""Train: `python train.py [dataset=...] [split=8] [sid=0] [key=value ...]` (see README.md)."""

import hydra
from omegaconf import DictConfig

import dmtc.config  # noqa: F401  (registers OmegaConf resolvers used by the configs)
from dmtc.cli import run_entry
from dmtc.tasks.train import train


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the final mIoU (for sweepers)."""
    return run_entry(train, cfg)["miou"]


if __name__ == "__main__":
    main()
