"""Pseudo-label a split: `python pseudo_label.py ckpt=PATH [names=unlabeled] [ratio=0.2] [...]` (see README.md)."""

import hydra
from omegaconf import DictConfig

import dmtc.config  # noqa: F401  (registers OmegaConf resolvers used by the configs)
from dmtc.cli import run_entry
from dmtc.tasks.pseudo_label import pseudo_label


@hydra.main(config_path="configs", config_name="pseudo_label", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the fraction of predicted pixels kept."""
    return run_entry(pseudo_label, cfg)["kept_fraction"]


if __name__ == "__main__":
    main()
