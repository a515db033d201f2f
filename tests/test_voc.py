"""PASCAL VOC 2012 + SBD in its usual layout (VOCdevkit/VOC2012): a miniature tree written here, DMT's
splits (generated, user lists, difference-maximized, SBD), the per-split schedules and the checks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

from dmtc.data.build import build_datamodule, build_layout
from dmtc.data.split_resolver import resolve_split
from dmtc.data.splits import dmt_split
from dmtc.data.voc import VOC_CLASSES, voc_palette
from dmtc.errors import DMTCError

NUM_TRAINAUG, NUM_TRAIN, NUM_VAL = 40, 12, 4


def make_voc_tree(root: Path, seed: int = 0) -> Path:
    """Write a miniature VOC2012: JPEGImages, SegmentationClassAug (0..20 and 255 borders), ImageSets lists."""
    rng = np.random.default_rng(seed)
    ids = [f"20{7 + i % 5:02d}_{i:06d}" for i in range(NUM_TRAINAUG + NUM_VAL)]
    trainaug, val = sorted(ids[:NUM_TRAINAUG]), ids[NUM_TRAINAUG:]
    train = trainaug[::3][:NUM_TRAIN]  # VOC's own train ids are part of trainaug
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(ids):
        h, w = 12 + k % 3, 16 + k % 4  # full-image evaluation: sizes differ
        cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        label = rng.integers(0, 21, (h, w)).astype(np.uint8)
        label[0] = 255
        cv2.imwrite(str(root / "SegmentationClassAug" / f"{name}.png"), label)
    sets = root / "ImageSets" / "Segmentation"
    for subset, names in (("trainaug", trainaug), ("train", train), ("val", val)):
        (sets / f"{subset}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


def voc_overrides(root: Path, *extra: str) -> list[str]:
    return ["dataset=voc", f"dataset.root={root}", "dataset.num_workers=0", *extra]


@pytest.fixture
def voc_root(tmp_path):
    return make_voc_tree(tmp_path / "VOCdevkit" / "VOC2012")


def test_classes_and_palette(compose_cfg, voc_root):
    cfg = compose_cfg(overrides=voc_overrides(voc_root))
    assert tuple(cfg.dataset.class_names) == VOC_CLASSES and cfg.dataset.num_classes == 21
    assert voc_palette()[:3] == [(0, 0, 0), (128, 0, 0), (0, 128, 0)] and voc_palette()[20] == (0, 64, 128)


def test_generated_split_and_full_image_loader(compose_cfg, voc_root):
    cfg = compose_cfg(overrides=voc_overrides(voc_root, "split=4", "sid=2"))
    datamodule, split = build_datamodule(cfg)
    trainaug = (voc_root / "ImageSets/Segmentation/trainaug.txt").read_text().split()
    # int(40 / 4) = 10
    assert (split.labeled, split.unlabeled) == dmt_split(trainaug, 4, 2) and len(split.labeled) == 10
    assert split.val == (voc_root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert Path(split.sources["labeled"]).read_text().split() == split.labeled
    item = datamodule.val_dataset()[1]
    image = cv2.imread(str(voc_root / "JPEGImages" / f"{split.val[1]}.jpg"))
    assert tuple(item["image"].shape[-2:]) == image.shape[:2]  # evaluated at full size
    assert int(item["label"].max()) == 255 and int(item["label"][1:].max()) <= 20
    batch = next(iter(datamodule.train_dataloader()))
    assert tuple(batch["image"].shape[-2:]) == tuple(cfg.dataset.crop_size)


def test_user_lists_with_path_columns(compose_cfg, voc_root):
    sets = voc_root / "ImageSets" / "Segmentation"
    trainaug = (sets / "trainaug.txt").read_text().split()
    (sets / "20_labeled_1.txt").write_text(
        "".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in trainaug[:3])
    )
    (sets / "20_unlabeled_1.txt").write_text("\n".join(trainaug[3:]) + "\n")
    cfg = compose_cfg(overrides=voc_overrides(voc_root, "split=20", "sid=1"))
    split = resolve_split(cfg, build_layout(cfg))
    assert split.labeled == trainaug[:3] and split.unlabeled == trainaug[3:]


def test_sbd_split(compose_cfg, voc_root):
    cfg = compose_cfg(overrides=voc_overrides(voc_root, "split=sbd"))
    split = resolve_split(cfg, build_layout(cfg))
    train = (voc_root / "ImageSets/Segmentation/train.txt").read_text().split()
    trainaug = (voc_root / "ImageSets/Segmentation/trainaug.txt").read_text().split()
    assert split.labeled == train
    assert split.unlabeled == [n for n in trainaug if n not in set(train)]
    assert len(split.unlabeled) == NUM_TRAINAUG - NUM_TRAIN
    assert cfg.dataset.schedule.max_epochs == 85 and cfg.dataset.schedule.dmt_phase.epochs == 5


def test_difference_maximized_subsets(compose_cfg, voc_root):
    subsets = {}
    for side in ("l", "r"):
        cfg = compose_cfg(overrides=voc_overrides(voc_root, f"split=8-{side}", "sid=1"))
        subsets[side] = resolve_split(cfg, build_layout(cfg))
    trainaug = (voc_root / "ImageSets/Segmentation/trainaug.txt").read_text().split()
    labeled, unlabeled = dmt_split(trainaug, 8, 1)  # int(40 / 8) = 5 labeled
    left, right = subsets["l"].labeled, subsets["r"].labeled
    assert len(left) == len(right) == 4  # 5 - ceil(0.2 * 5)
    assert set(left) | set(right) == set(labeled) and len(set(left) & set(right)) == 3
    assert subsets["l"].unlabeled == unlabeled  # the pair pseudo-labels split 8's unlabeled images
    assert cfg.dataset.schedule.max_epochs == 85  # 8-l/8-r train with split 8's schedule


def test_schedules_follow_split_and_stay_overridable(compose_cfg, voc_root):
    def composed(*extra):  # without debug=smoke, which shortens the trainer
        return compose_cfg(overrides=voc_overrides(voc_root, "~debug", *extra))

    cfg = composed("split=20")
    assert (cfg.trainer.max_epochs, cfg.optim.lr, cfg.trainer.val_check_interval) == (134, 0.002, 220)
    assert cfg.dataset.batch_size == 8 and cfg.trainer.check_val_every_n_epoch is None
    assert OmegaConf.to_container(cfg.dataset.schedule.dmt_phase) == {
        "epochs": 4, "lr": 0.001, "gamma1": 5, "gamma2": 5, "labeled_batch_size": 1, "unlabeled_batch_size": 7,
        "val_check_interval": 500}
    cfg = composed("split=106")
    assert cfg.dataset.schedule.max_epochs == 300 and cfg.dataset.schedule.models.b.labeled == "106-r"
    cfg = composed("split=2")  # unpublished: the documented default
    assert cfg.dataset.schedule.max_epochs == 134 and cfg.dataset.schedule.val_check_interval == 500
    cfg = composed("split=20", "optim.lr=0.01", "dataset.schedules.20.dmt_phase.gamma1=2")
    assert cfg.optim.lr == 0.01 and cfg.dataset.schedule.dmt_phase.gamma1 == 2


def test_city_schedules(compose_cfg, tmp_path):
    root = tmp_path / "cityscapes"
    for split, epochs, every in (("8", 170, 350), ("30", 330, 100), ("4", 120, 500), ("20", 170, 350)):
        cfg = compose_cfg(overrides=["dataset=city", f"dataset.root={root}", "~debug", f"split={split}"])
        assert cfg.dataset.schedule.max_epochs == epochs and cfg.optim.lr == 0.004
        assert cfg.dataset.schedule.dmt_phase.gamma1 == 3 and cfg.dataset.schedule.dmt_phase.unlabeled_batch_size == 6
        assert cfg.trainer.max_epochs == epochs and cfg.trainer.val_check_interval == every
    cfg = compose_cfg(overrides=["dataset=city", f"dataset.root={root}", "~debug", "split=30", "trainer.max_epochs=7"])
    assert cfg.trainer.max_epochs == 7 and cfg.dataset.batch_size == 8


def test_missing_list_file(compose_cfg, voc_root):
    (voc_root / "ImageSets/Segmentation/trainaug.txt").unlink()
    cfg = compose_cfg(overrides=voc_overrides(voc_root))
    with pytest.raises(DMTCError, match="trainaug.txt does not exist"):
        build_datamodule(cfg)


def test_missing_root(compose_cfg, tmp_path):
    cfg = compose_cfg(overrides=voc_overrides(tmp_path / "nowhere"))
    with pytest.raises(DMTCError, match=r"nowhere.*dataset.root"):
        build_datamodule(cfg)


def test_list_naming_a_missing_image(compose_cfg, voc_root):
    val = voc_root / "ImageSets/Segmentation/val.txt"
    val.write_text(val.read_text() + "2012_999999\n")
    cfg = compose_cfg(overrides=voc_overrides(voc_root))
    with pytest.raises(DMTCError, match=r"val.txt[\s\S]*2012_999999.jpg"):
        build_datamodule(cfg)


def test_label_value_outside_classes(compose_cfg, voc_root):
    name = (voc_root / "ImageSets/Segmentation/val.txt").read_text().split()[0]
    path = voc_root / "SegmentationClassAug" / f"{name}.png"
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    label[1, 0] = 21
    cv2.imwrite(str(path), label)
    cfg = compose_cfg(overrides=voc_overrides(voc_root))
    with pytest.raises(DMTCError, match=rf"{name}.png holds values \[21\]"):
        build_datamodule(cfg)


def test_small_validation_subset(compose_cfg, voc_root):
    cfg = compose_cfg(overrides=voc_overrides(voc_root, "dataset.val_max_images=2"))
    split = resolve_split(cfg, build_layout(cfg))
    val = (voc_root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert split.val == [val[0], val[2]]
