"""``debug=smoke`` works for every dataset × method (miniature official-layout trees, real Hydra composition,
real Trainer): the pair of a dataset whose protocol needs ResNet-101 weights falls back to two seeds of random
init, DMT phases label at most 12 unlabeled images, and the run stays small on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONFIGS, TINY_OVERRIDES
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from test_cityscapes import make_city_tree
from test_from_checkpoint import FOLDER, _folder_tree
from test_voc import make_voc_tree

from dmtc.tasks.train import train


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, list[str]]:
    base = tmp_path_factory.mktemp("smoke_data")
    return {
        "synthetic": TINY_OVERRIDES,
        "city": ["dataset=city", f"dataset.root={make_city_tree(base / 'cityscapes')}"],
        "voc": ["dataset=voc", f"dataset.root={make_voc_tree(base / 'VOC2012')}"],
        "folder": [*FOLDER, f"dataset.root={_folder_tree(base / 'mine', unlabeled=14)}"],
    }


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


@pytest.mark.parametrize("method", ["dmtc", "dmt", "supervised"])
@pytest.mark.parametrize("dataset", ["city", "voc", "folder", "synthetic"])
def test_smoke_runs_every_dataset_and_method(trees, tmp_path, dataset, method, caplog):
    overrides = ["debug=smoke", f"method={method}", f"paths.cache_dir={tmp_path / 'cache'}",
                 f"paths.log_dir={tmp_path / 'out'}", *trees[dataset]]
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    run = tmp_path / "run"
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run)
    HydraConfig.instance().set_config(cfg)
    run.mkdir()
    with caplog.at_level("INFO"):
        results = train(cfg)
    assert results["dataset"] == cfg.dataset.name and 0 <= results["miou"] <= 100
    if method == "supervised":
        assert "phases" not in results
    else:
        assert [p["name"] for p in results["phases"]] == ["phase0_warmup", "phase1_r0.5", "phase2_r1"]
        assert results["num_unlabeled"] <= 12
        if dataset in ("city", "voc"):  # the protocol's COCO/ImageNet pair needs ResNet-101 weight files
            assert results["pair_init"] == "seeds" and results["pair"]["inits"] == {"a": "none", "b": "none"}
            assert "debug=smoke: the pair's inits" in caplog.text
        if dataset == "folder":  # images/unlabeled/ is the unlabeled split; no quality without labels
            assert results["split"] == "train+unlabeled" and results["num_labeled"] == 12
            assert "quality" not in results["phases"][1]["pseudo"]["a"]
        # finished phases keep their best weights only
        assert not list(run.rglob("last.ckpt"))
    assert _size_mb(run) < 30
