"""Cityscapes in its official layout: a miniature tree written here (tiny PNGs with void ids, colour,
instance and polygon files beside the label ids), read through the real configs and builders."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest
from cityscapesscripts.helpers.labels import labels as CS_LABELS
from omegaconf import open_dict

from dmtc.data.build import build_datamodule, build_layout
from dmtc.data.cityscapes import cityscapes_class_names, cityscapes_lut, cityscapes_palette
from dmtc.data.split_resolver import resolve_split
from dmtc.data.splits import dmt_split
from dmtc.errors import DMTCError

CITIES = {"train": ["aachen", "bochum", "zurich"], "val": ["frankfurt", "lindau"], "test": ["berlin"]}
PER_CITY = {"train": 6, "val": 2, "test": 1}
SIZE = (16, 32)  # H, W
# label ids present in the miniature labels: void ones (0 unlabeled, 1 ego vehicle, 4 static, 5 dynamic)
# and classes (7 road → 0, 11 building → 2, 23 sky → 10, 26 car → 13, 33 bicycle → 18)
IDS = np.array([0, 1, 4, 5, 7, 11, 23, 26, 33], dtype=np.uint8)


def make_city_tree(root: Path, seed: int = 0) -> Path:
    """Write a miniature Cityscapes: leftImg8bit/{train,val,test}/<city>/..., gtFine/{train,val}/<city>/..."""
    rng = np.random.default_rng(seed)
    for subset, cities in CITIES.items():
        for city in cities:
            (root / "leftImg8bit" / subset / city).mkdir(parents=True, exist_ok=True)
            if subset != "test":
                (root / "gtFine" / subset / city).mkdir(parents=True, exist_ok=True)
            for i in range(PER_CITY[subset]):
                stem = f"{city}_{i:06d}_000019"
                image = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
                cv2.imwrite(str(root / "leftImg8bit" / subset / city / f"{stem}_leftImg8bit.png"), image)
                if subset == "test":
                    continue
                gt = root / "gtFine" / subset / city
                label = IDS[rng.integers(0, len(IDS), SIZE)]
                cv2.imwrite(str(gt / f"{stem}_gtFine_labelIds.png"), label)
                cv2.imwrite(str(gt / f"{stem}_gtFine_color.png"), rng.integers(0, 256, (*SIZE, 4), dtype=np.uint8))
                cv2.imwrite(str(gt / f"{stem}_gtFine_instanceIds.png"), (label.astype(np.uint16) * 1000))
                (gt / f"{stem}_gtFine_polygons.json").write_text(json.dumps({"imgHeight": SIZE[0], "objects": []}))
    return root


def city_overrides(root: Path, *extra: str) -> list[str]:
    return ["dataset=city", f"dataset.root={root}", "dataset.num_workers=0", *extra]


@pytest.fixture
def city_root(tmp_path):
    return make_city_tree(tmp_path / "cityscapes")


def test_label_table_matches_cityscapesscripts():
    lut = cityscapes_lut()
    for label in CS_LABELS:
        if label.id < 0:
            continue
        expected = label.trainId if 0 <= label.trainId < 255 else 255
        assert lut[label.id] == expected, label
    assert lut[7] == 0 and lut[26] == 13 and lut[33] == 18 and lut[0] == 255 and lut[34:].max() == 255
    assert len(cityscapes_class_names()) == 19 and cityscapes_class_names()[0] == "road"
    assert cityscapes_palette()[0] == (128, 64, 128)


def test_config_classes_are_the_label_table(compose_cfg, city_root):
    cfg = compose_cfg(overrides=city_overrides(city_root))
    assert list(cfg.dataset.class_names) == cityscapes_class_names()
    assert cfg.dataset.num_classes == 19 and cfg.dataset.label_map == "cityscapes"


def test_names_splits_and_loader(compose_cfg, city_root):
    cfg = compose_cfg(overrides=city_overrides(city_root, "split=2", "sid=1", "backbone=resnet_tiny", "~debug"))
    layout = build_layout(cfg)
    train = layout.names("train")
    assert len(train) == 18 and train == sorted(train) and train[0] == "aachen/aachen_000000_000019"
    split = resolve_split(cfg, layout)
    # int(18 / 2) = 9 is 1 (mod 8): DMT labels one more image
    assert len(split.labeled) == 10 and len(split.unlabeled) == 8
    assert (split.labeled, split.unlabeled) == dmt_split(train, 2, 1)
    assert len(split.val) == 4 and split.val[0].startswith("frankfurt/")
    generated = Path(cfg.dataset.split_dir) / "2_labeled_1.txt"
    assert generated.read_text().split() == split.labeled

    datamodule, _ = build_datamodule(cfg)
    item = datamodule.val_dataset()[0]
    assert tuple(item["image"].shape) == (3, 512, 1024)  # DMT evaluates at 512×1024
    values = set(item["label"].unique().tolist())
    assert values <= {0, 2, 10, 13, 18, 255} and 255 in values and values - {255}
    batch = next(iter(datamodule.train_dataloader()))
    assert tuple(batch["image"].shape[-2:]) == tuple(cfg.dataset.crop_size)


def test_user_lists_in_dmt_format_win(compose_cfg, city_root):
    lists = city_root / "data_lists"
    lists.mkdir()
    names = ["bochum/bochum_000002_000019", "zurich/zurich_000001_000019"]
    # one plain name, one line with extra columns given as paths (first token counts)
    (lists / "8_labeled_0.txt").write_text(
        f"{names[0]}\nleftImg8bit/train/{names[1]}_leftImg8bit.png gtFine/train/{names[1]}_gtFine_labelIds.png\n"
    )
    (lists / "8_unlabeled_0.txt").write_text("aachen/aachen_000000_000019\n")
    cfg = compose_cfg(overrides=city_overrides(city_root))
    split = resolve_split(cfg, build_layout(cfg))
    assert split.labeled == names and split.unlabeled == ["aachen/aachen_000000_000019"]
    assert split.sources["labeled"] == str(lists / "8_labeled_0.txt")
    assert not Path(cfg.dataset.split_dir).exists()  # nothing generated


def test_read_only_root_generates_lists_elsewhere(compose_cfg, city_root, tmp_path):
    cfg = compose_cfg(overrides=city_overrides(city_root, "split=4", "backbone=resnet_tiny"))
    modes = {}
    for path in [city_root, *city_root.rglob("*")]:
        if path.is_dir():
            modes[path] = path.stat().st_mode
            path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    # as root chmod does not stop writes: compare the root's files (names and contents) before and after
    before = {p: p.read_bytes() for p in city_root.rglob("*") if p.is_file()}
    try:
        datamodule, split = build_datamodule(cfg)
        assert len(split.labeled) == 4
        assert Path(split.sources["labeled"]).parent == Path(cfg.dataset.split_dir)
        assert str(tmp_path / "cache") in cfg.dataset.split_dir
        assert {p: p.read_bytes() for p in city_root.rglob("*") if p.is_file()} == before
        assert Path(cfg.dataset.split_dir, "4_labeled_0.txt").is_file()
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def test_missing_subfolder_is_named(compose_cfg, city_root):
    for path in sorted((city_root / "gtFine" / "val").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (city_root / "gtFine" / "val").rmdir()
    cfg = compose_cfg(overrides=city_overrides(city_root))
    with pytest.raises(DMTCError, match=r"label folder .*gtFine/val.* dataset.root"):
        build_datamodule(cfg)


def test_image_without_label_is_named(compose_cfg, city_root):
    (city_root / "gtFine" / "val" / "lindau" / "lindau_000001_000019_gtFine_labelIds.png").unlink()
    cfg = compose_cfg(overrides=city_overrides(city_root))
    with pytest.raises(DMTCError, match="lindau_000001_000019_gtFine_labelIds.png"):
        build_datamodule(cfg)


def test_label_values_outside_the_table(compose_cfg, city_root):
    # trainIds-style files (255 is fine, but 34+ are not label ids of the table) are caught
    bad = city_root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000019_gtFine_labelIds.png"
    label = cv2.imread(str(bad), cv2.IMREAD_UNCHANGED)
    label[0, :4] = [40, 255, 7, 99]
    cv2.imwrite(str(bad), label)
    cfg = compose_cfg(overrides=city_overrides(city_root, "dataset.validate_samples=100"))
    with pytest.raises(DMTCError, match=r"frankfurt_000000_000019_gtFine_labelIds.png holds values \[40, 99\]"):
        build_datamodule(cfg)


def test_colour_file_as_label_is_refused(compose_cfg, city_root):
    cfg = compose_cfg(overrides=city_overrides(city_root))
    with open_dict(cfg):
        cfg.dataset.label_template = "gtFine/{subset}/{name}_gtFine_color.png"
    with pytest.raises(DMTCError, match="single-channel 8-bit"):
        build_datamodule(cfg)


def test_list_naming_missing_files(compose_cfg, city_root):
    lists = city_root / "data_lists"
    lists.mkdir()
    (lists / "8_labeled_0.txt").write_text("aachen/aachen_000000_000019\naachen/aachen_000099_000019\n")
    (lists / "8_unlabeled_0.txt").write_text("bochum/bochum_000000_000019\n")
    cfg = compose_cfg(overrides=city_overrides(city_root))
    # the message names the list and the missing file (in that order)
    with pytest.raises(DMTCError, match=r"8_labeled_0\.txt[\s\S]*aachen_000099_000019_leftImg8bit\.png"):
        build_datamodule(cfg)
    (lists / "8_unlabeled_0.txt").unlink()
    with pytest.raises(DMTCError, match="8_unlabeled_0.txt"):
        build_datamodule(cfg)


def test_train_entry_point_on_a_miniature_cityscapes(tmp_path):
    from conftest import run_script, tiny_run_overrides

    root = make_city_tree(tmp_path / "cityscapes")
    args = [*tiny_run_overrides(tmp_path, synthetic=False), *city_overrides(root, "split=2", "sid=1")]
    proc = run_script("train.py", args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "train").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["dataset"] == "city" and results["num_labeled"] == 10 and results["num_val"] == 4
    assert set(results["per_class_iou"]) == set(cityscapes_class_names())
