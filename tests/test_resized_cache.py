"""The one-time resized cache (``dataset.resized_cache=true``, :mod:`dmtc.data.resized_cache`) on a
miniature Cityscapes of 256×128 originals cached at base size 64×128: real PNG files, real configs."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dmtc.data.build import build_datamodule, build_layout
from dmtc.data.resized_cache import build_resized_cache, resize_sample
from dmtc.files import MANIFEST

CITIES = {"train": ["aachen", "bochum"], "val": ["frankfurt"]}
PER_CITY = {"train": 5, "val": 3}
SIZE = (128, 256)  # originals, H×W
BASE = (64, 128)
# raw label ids: void (0 unlabeled, 1 ego vehicle, 4 static, 5 dynamic) and classes (7 road, 11 building,
# 23 sky, 26 car, 33 bicycle); written as blocks so nearest resizing keeps every id
IDS = np.array([0, 1, 4, 5, 7, 11, 23, 26, 33], dtype=np.uint8)


def make_tree(root: Path, seed: int = 0) -> Path:
    """Write the miniature tree: smooth images with noise, blocky label-id maps holding void ids."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : SIZE[0], 0 : SIZE[1]]
    for subset, cities in CITIES.items():
        for city in cities:
            (root / "leftImg8bit" / subset / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / subset / city).mkdir(parents=True, exist_ok=True)
            for i in range(PER_CITY[subset]):
                stem = f"{city}_{i:06d}_000019"
                base = np.stack([xx * 255 // SIZE[1], yy * 255 // SIZE[0], (xx + yy) % 256], -1)
                image = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
                cv2.imwrite(str(root / "leftImg8bit" / subset / city / f"{stem}_leftImg8bit.png"), image)
                blocks = IDS[rng.integers(0, len(IDS), (SIZE[0] // 16, SIZE[1] // 16))]
                label = np.kron(blocks, np.ones((16, 16), dtype=np.uint8))
                cv2.imwrite(str(root / "gtFine" / subset / city / f"{stem}_gtFine_labelIds.png"), label)
    return root


@pytest.fixture
def city_root(tmp_path):
    return make_tree(tmp_path / "cityscapes")


def overrides(root: Path, *extra: str) -> list[str]:
    return ["dataset=city", f"dataset.root={root}", "dataset.num_workers=0", "backbone=resnet_tiny", "split=2",
            f"dataset.base_size=[{BASE[0]},{BASE[1]}]", f"dataset.eval_size=[{BASE[0]},{BASE[1]}]",
            "dataset.crop_size=[32,64]", *extra]


def cache_files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_cache_is_built_once_with_exact_labels(compose_cfg, city_root, tmp_path):
    cfg = compose_cfg(overrides=overrides(city_root, "dataset.resized_cache=true"))
    datamodule, split = build_datamodule(cfg)
    # city resizes as the reference code (plain bilinear): the cache says so in its folder name and manifest
    root = Path(cfg.dataset.resized_cache_dir) / f"{BASE[0]}x{BASE[1]}-bilinear"
    assert root.is_relative_to(tmp_path / "cache") and datamodule.layout.root == root
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["count"] == 10 + 3 and manifest["size"] == list(BASE) and manifest["antialias"] is False
    assert manifest["source_root"] == str(city_root.resolve())
    source = build_layout(cfg)
    for subset, names in (("train", split.labeled + split.unlabeled), ("val", split.val)):
        for name in names:
            image = cv2.imread(str(datamodule.layout.image_path(subset, name)), cv2.IMREAD_COLOR)
            assert image.shape == (*BASE, 3)
            raw = cv2.imread(str(source.label_path(subset, name)), cv2.IMREAD_UNCHANGED)
            cached = cv2.imread(str(datamodule.layout.label_path(subset, name)), cv2.IMREAD_UNCHANGED)
            assert cached.shape == BASE and cached.dtype == np.uint8
            # raw ids kept (label_map applies on reading), nearest: no new values, void ids preserved
            assert set(np.unique(cached)) <= set(np.unique(raw)) and set(np.unique(cached)) == set(np.unique(raw))
            assert np.array_equal(cached, resize_sample(np.zeros((*SIZE, 3), np.uint8), raw, BASE)[1])
    before = cache_files(root)
    build_datamodule(cfg)  # second call: nothing rewritten, not even the manifest
    assert cache_files(root) == before


def test_interrupted_or_stale_cache_is_completed(compose_cfg, city_root):
    cfg = compose_cfg(overrides=overrides(city_root, "dataset.resized_cache=true"))
    datamodule, split = build_datamodule(cfg)
    layout, root = datamodule.layout, datamodule.layout.root
    (root / MANIFEST).unlink()
    lost_image = layout.image_path("train", split.labeled[0])
    lost_label = layout.label_path("val", split.val[0])
    reference = {p: p.read_bytes() for p in (lost_image, lost_label)}
    lost_image.unlink()
    lost_label.unlink()
    changed = build_layout(cfg).image_path("train", split.unlabeled[0])  # source edited after the cache
    future = changed.stat().st_mtime + 10
    os.utime(changed, (future, future))
    before = cache_files(root)
    build_datamodule(cfg)
    after = cache_files(root)
    assert (root / MANIFEST).is_file() and all(p.read_bytes() == b for p, b in reference.items())
    rebuilt = {p for p in after if before.get(p) != after[p]}
    samples = [("train", split.labeled[0]), ("val", split.val[0]), ("train", split.unlabeled[0])]
    # a sample (image + label) is rebuilt as a unit; every other file is reused untouched
    assert rebuilt == {root / MANIFEST, *(layout.image_path(*s) for s in samples),
                       *(layout.label_path(*s) for s in samples)}


def test_cached_and_uncached_batches_are_identical(compose_cfg, city_root):
    """The cache stores the transform's own resize losslessly, so with the same seed every training sample
    (random scale, crop, flip) and every validation sample is bit-identical, not just close."""
    plain, _ = build_datamodule(compose_cfg(overrides=overrides(city_root)))
    cached, _ = build_datamodule(compose_cfg(overrides=overrides(city_root, "dataset.resized_cache=true")))
    assert cached.layout.root != plain.layout.root and cached.val_layout == cached.layout
    for make in ("train_dataset", "val_dataset"):
        a, b = getattr(plain, make)(), getattr(cached, make)()
        for index in range(len(a)):
            torch.manual_seed(index)
            x = a[index]
            torch.manual_seed(index)
            y = b[index]
            assert x["name"] == y["name"]
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
            assert (x["label"] != 255).any()  # the label map applied to the cached raw ids as well


def test_full_size_validation_keeps_the_originals(compose_cfg, city_root):
    cfg = compose_cfg(overrides=overrides(city_root, "dataset.resized_cache=true", "dataset.eval_size=null"))
    datamodule, split = build_datamodule(cfg)
    assert datamodule.val_layout.root == city_root and datamodule.layout.root != city_root
    assert json.loads((datamodule.layout.root / MANIFEST).read_text())["names"].keys() == {"train"}
    assert datamodule.val_dataset()[0]["image"].shape[-2:] == SIZE


def test_read_only_root_and_worker_pool(compose_cfg, city_root, tmp_path):
    cfg = compose_cfg(overrides=overrides(city_root, "dataset.resized_cache=true"))
    modes = {}
    for path in [city_root, *city_root.rglob("*")]:
        if path.is_dir():
            modes[path] = path.stat().st_mode
            path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        before = sorted(city_root.rglob("*"))
        datamodule, split = build_datamodule(cfg)
        assert sorted(city_root.rglob("*")) == before
        # the same cache built by two worker processes is byte-identical to the in-process one
        names = {"train": split.labeled + split.unlabeled, "val": split.val}
        pooled = build_resized_cache(build_layout(cfg), names, BASE, tmp_path / "pooled", processes=2,
                                     antialias=cfg.dataset.antialias)
        for subset, subset_names in names.items():
            for name in subset_names:
                for path in ("image_path", "label_path"):
                    mine = getattr(pooled, path)(subset, name).read_bytes()
                    assert mine == getattr(datamodule.layout, path)(subset, name).read_bytes()
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def test_builders_at_once_take_turns(compose_cfg, city_root, tmp_path, caplog):
    """Two builders of one cache at the same time (DDP ranks or SLURM tasks starting together): one builds it,
    the other waits on the lock and finds it complete."""
    import logging
    import threading

    cfg = compose_cfg(overrides=overrides(city_root))
    layout = build_layout(cfg)
    names = {"val": build_datamodule(cfg)[1].val}
    errors: list[BaseException] = []

    def build() -> None:
        try:
            build_resized_cache(layout, names, BASE, tmp_path / "shared", processes=1)
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    with caplog.at_level(logging.INFO, logger="dmtc.data.resized_cache"):
        threads = [threading.Thread(target=build) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors and names["val"]
    assert sum("is complete" in r.getMessage() for r in caplog.records) == 1
    assert json.loads((tmp_path / "shared" / MANIFEST).read_text())["count"] == len(names["val"])
