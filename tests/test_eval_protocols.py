"""Evaluation protocols (DMT §4.1 ``dmt`` and original-resolution ``full``), test-time flip / multi-scale,
prediction export, and equality of our mIoU with cityscapesscripts' official evaluation on the exported
label-id PNGs of a miniature Cityscapes val tree (real files in tmp_path, a tiny real model)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cityscapesscripts.helpers.labels import labels as CS_LABELS
from conftest import expect_user_error
from PIL import Image
from test_cityscapes import city_overrides, make_city_tree
from test_voc import make_voc_tree, voc_overrides

from dmtc.data.voc import voc_palette
from dmtc.export import cityscapes_train_to_label_ids
from dmtc.inference import pad_bottom_right, predict_probs
from dmtc.models import deeplab_v2
from dmtc.tasks.evaluate import evaluate

CLASS_LABEL_IDS = {label.id for label in CS_LABELS if 0 <= label.trainId < 255}


def _tiny_model(num_classes: int, seed: int = 0) -> torch.nn.Module:
    """resnet_tiny DeepLab-v2 with a strong random head, so its predictions vary over classes."""
    torch.manual_seed(seed)
    model = deeplab_v2(num_classes, backbone="resnet_tiny")
    for conv in model.classifier.convs:
        torch.nn.init.normal_(conv.weight, std=0.5)
        torch.nn.init.normal_(conv.bias, std=0.5)
    return model.eval()


def _checkpoint(tmp_path: Path, num_classes: int) -> Path:
    """A DMT-format file ({'model': state_dict} with classifier.0.convs keys) of a tiny model."""
    state = {k.replace("classifier.convs.", "classifier.0.convs."): v
             for k, v in _tiny_model(num_classes).state_dict().items()}
    path = tmp_path / f"tiny_{num_classes}.pt"
    torch.save({"model": state}, path)
    return path


def test_predict_probs_pad_flip_and_scales():
    model = _tiny_model(5)
    images = torch.randn(2, 3, 20, 30)
    plain = predict_probs(model, images)
    reference = F.interpolate(model(images)["logits"], size=(20, 30), mode="bilinear").softmax(1)
    assert torch.allclose(plain, reference, atol=1e-6)

    # padding (DMT VOC 505×505): run on the zero-padded image, upsample to the padded size, crop the padding
    padded = predict_probs(model, images, pad_to=(40, 48))
    big = pad_bottom_right(images, (40, 48))
    assert tuple(big.shape[-2:]) == (40, 48) and torch.equal(big[..., :20, :30], images)
    assert big[..., 20:, :].eq(0).all() and big[..., 30:].eq(0).all()
    manual = F.interpolate(model(big)["logits"], size=(40, 48), mode="bilinear").softmax(1)[..., :20, :30]
    assert padded.shape == plain.shape and torch.allclose(padded, manual, atol=1e-6)
    assert tuple(pad_bottom_right(images, (10, 10)).shape[-2:]) == (20, 30)  # never crops

    # flip: the average over image and mirror is mirror-symmetric
    flipped = predict_probs(model, images, flip=True)
    assert torch.allclose(flipped, predict_probs(model, images.flip(-1), flip=True).flip(-1), atol=1e-5)
    assert torch.allclose(flipped, (plain + predict_probs(model, images.flip(-1)).flip(-1)) / 2, atol=1e-6)

    # multi-scale at a requested output size: a probability map of that size
    multi = predict_probs(model, images, (40, 60), scales=[0.75, 1.0, 1.25], flip=True)
    assert multi.shape == (2, 5, 40, 60) and torch.allclose(multi.sum(1), torch.ones(2, 40, 60), atol=1e-5)
    assert not torch.allclose(multi, F.interpolate(plain, size=(40, 60), mode="bilinear"), atol=1e-4)


def _official_cityscapes(root: Path, export: Path, monkeypatch) -> dict:
    """cityscapesscripts' csEvalPixelLevelSemanticLabeling on the export folder, in-process."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs

    for key, value in {"evalInstLevelScore": False, "JSONOutput": False, "quiet": True,
                       "predictionPath": str(export), "predictionWalk": None}.items():
        monkeypatch.setattr(cs.args, key, value)
    gts = sorted(str(p) for p in (root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    preds = [cs.getPrediction(cs.args, gt) for gt in gts]
    return cs.evaluateImgLists(preds, gts, cs.args)


def test_cityscapes_full_protocol_export_equals_official_script(compose_cfg, tmp_path, monkeypatch, capsys):
    root = make_city_tree(tmp_path / "cityscapes")
    export = tmp_path / "export"
    cfg = compose_cfg("evaluate", overrides=city_overrides(
        root, "backbone=resnet_tiny", f"ckpt={_checkpoint(tmp_path, 19)}", "eval.protocol=full",
        f"eval.export_dir={export}"))
    results = evaluate(cfg)
    assert "mIoU" in capsys.readouterr().out
    assert (Path(cfg.paths.output_dir) / "results.json").is_file()
    assert results["eval"]["protocol"] == "full" and results["eval"]["resize"] is None

    files = sorted(export.iterdir())
    assert len(files) == results["num_val"] == 4
    assert files[0].name == "frankfurt_000000_000019_pred.png"
    pred = cv2.imread(str(files[0]), cv2.IMREAD_UNCHANGED)
    assert pred.dtype == np.uint8 and pred.shape == (16, 32)  # original size, one channel
    assert set(np.unique(pred).tolist()) <= CLASS_LABEL_IDS  # label ids, not train ids
    assert len(np.unique(pred)) > 2

    official = _official_cityscapes(root, export, monkeypatch)
    assert results["miou"] == pytest.approx(100 * official["averageScoreClasses"], abs=1e-3)
    for name, iou in results["per_class_iou"].items():
        theirs = official["classScores"][name]
        assert (iou is None) == math.isnan(theirs), name
        if iou is not None:
            assert iou == pytest.approx(100 * theirs, abs=1e-3), name


def test_cityscapes_dmt_protocol(compose_cfg, tmp_path):
    root = make_city_tree(tmp_path / "cityscapes")
    ckpt = _checkpoint(tmp_path, 19)
    export = tmp_path / "export"
    common = [f"ckpt={ckpt}", "backbone=resnet_tiny", "~debug"]  # debug=smoke would skip the 512×1024 resize
    dmt = evaluate(compose_cfg("evaluate", overrides=city_overrides(root, *common, f"eval.export_dir={export}")))
    assert dmt["eval"]["protocol"] == "dmt" and dmt["eval"]["resize"] == [512, 1024]  # DMT §4.1 default
    pred = cv2.imread(str(export / "lindau_000001_000019_pred.png"), cv2.IMREAD_UNCHANGED)
    assert pred.shape == (16, 32)  # exports are at the original size whatever the protocol
    # the dmt protocol at the original size is the full protocol
    same = evaluate(compose_cfg("evaluate", overrides=city_overrides(root, *common, "dataset.eval_size=null")))
    full = evaluate(compose_cfg("evaluate", overrides=city_overrides(root, *common, "eval.protocol=full")))
    assert same["miou"] == pytest.approx(full["miou"], abs=1e-6)
    assert dmt["miou"] != pytest.approx(full["miou"], abs=1e-3)
    tta_cfg = compose_cfg("evaluate", overrides=city_overrides(
        root, *common, "eval.protocol=full", "eval.flip=true", "eval.scales=[0.75,1.0,1.25]"))
    tta = evaluate(tta_cfg)
    assert tta["eval"]["flip"] and tta["eval"]["scales"] == [0.75, 1.0, 1.25]
    # the same numbers from the rebuilt model's flip + multi-scale probabilities on the original images
    from dmtc.from_checkpoint import restore
    from dmtc.metrics import make_miou_metric, summarize
    from dmtc.tasks.evaluate import build_val_loader

    restored = restore(tta_cfg, ckpt)
    model, metric = restored.model.eval(), make_miou_metric(19)
    for batches in build_val_loader(restored.cfg, None, restored.inputs):  # each: batches of one image size
        for batch in batches:
            probs = predict_probs(model, batch["image"], batch["label"].shape[-2:], scales=[0.75, 1.0, 1.25],
                                  flip=True)
            metric.update(probs.argmax(1), batch["label"])
    assert tta["miou"] == pytest.approx(summarize(metric.confmat, restored.cfg.dataset.class_names)["miou"], abs=1e-6)
    assert tta["miou"] != pytest.approx(full["miou"], abs=1e-3)


def test_voc_padding_and_palette_export(compose_cfg, tmp_path):
    root = make_voc_tree(tmp_path / "VOCdevkit" / "VOC2012")
    export = tmp_path / "export"
    common = [f"ckpt={_checkpoint(tmp_path, 21)}", "backbone=resnet_tiny"]
    dmt = evaluate(compose_cfg("evaluate", overrides=voc_overrides(root, *common, f"eval.export_dir={export}")))
    assert dmt["eval"]["pad_to"] == [505, 505] and dmt["eval"]["resize"] is None
    full = evaluate(compose_cfg("evaluate", overrides=voc_overrides(root, *common, "eval.protocol=full")))
    assert full["eval"]["pad_to"] is None and full["num_val"] == dmt["num_val"] == 4

    files = sorted(export.glob("*.png"))
    assert len(files) == 4
    name = files[0].stem
    image = Image.open(files[0])
    label = cv2.imread(str(root / "SegmentationClassAug" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
    assert image.mode == "P" and image.size == (label.shape[1], label.shape[0])
    palette = image.getpalette()
    assert tuple(palette[3:6]) == voc_palette()[1] == (128, 0, 0)
    assert np.array(image).max() < 21


def test_cityscapes_label_id_table():
    lut = cityscapes_train_to_label_ids()
    assert lut[0] == 7 and lut[13] == 26 and lut[18] == 33  # road, car, bicycle
    assert {int(lut[t]) for t in range(19)} == CLASS_LABEL_IDS


def test_unknown_protocol_is_one_message(compose_cfg, capsys, tmp_path):
    cfg = compose_cfg("evaluate", overrides=[f"ckpt={_checkpoint(tmp_path, 10)}", "eval.protocol=official"])
    expect_user_error(evaluate, cfg, capsys, "eval.protocol=official", "dmt", "full")


def test_sliding_window_averages_overlapping_softmaxes():
    from dmtc.inference import slide_probs

    model = _tiny_model(5)
    torch.manual_seed(3)
    images = torch.randn(2, 3, 20, 30)
    # one window covering the image: the whole-image prediction
    whole = predict_probs(model, images)
    assert torch.allclose(slide_probs(model, images, (20, 30), (13, 20)), whole, atol=1e-6)
    # windows 12×12 every 8: rows 0, 8; columns 0, 8, 16, 18 (the last flush with the border)
    total, count = torch.zeros(2, 5, 20, 30), torch.zeros(20, 30)
    for top in (0, 8):
        for left in (0, 8, 16, 18):
            crop = images[..., top:top + 12, left:left + 12]
            probs = F.interpolate(model(crop)["logits"], size=(12, 12), mode="bilinear").softmax(1)
            total[..., top:top + 12, left:left + 12] += probs
            count[top:top + 12, left:left + 12] += 1
    assert count.min() >= 1
    assert torch.allclose(slide_probs(model, images, (12, 12), (8, 8)), total / count, atol=1e-5)
    assert not torch.allclose(total / count, whole, atol=1e-3)
    # an image smaller than the window is padded, then cropped back
    small = slide_probs(model, images[..., :10, :10], (12, 12), (8, 8))
    padded = F.pad(images[..., :10, :10], (0, 2, 0, 2))
    ref = F.interpolate(model(padded)["logits"], size=(12, 12), mode="bilinear").softmax(1)[..., :10, :10]
    assert small.shape == (2, 5, 10, 10) and torch.allclose(small, ref, atol=1e-6)
    # predict_probs: slide with flip averages both passes; the default stride is 2/3 of the window
    flipped = predict_probs(model, images, window=(12, 12), flip=True)
    mirror = slide_probs(model, images.flip(-1), (12, 12), (8, 8)).flip(-1)
    assert torch.allclose(flipped, (total / count + mirror) / 2, atol=1e-5)


def test_slide_mode_through_evaluate(compose_cfg, capsys, tmp_path):
    root = make_voc_tree(tmp_path / "VOCdevkit" / "VOC2012")
    common = [f"ckpt={_checkpoint(tmp_path, 21)}", "eval.protocol=full"]
    whole = evaluate(compose_cfg("evaluate", overrides=voc_overrides(root, *common)))
    slide = evaluate(compose_cfg("evaluate", overrides=voc_overrides(
        root, *common, "eval.mode=slide", "eval.slide_window=[8,8]")))
    assert whole["eval"]["mode"] == "whole" and whole["eval"]["window"] is None
    assert slide["eval"]["mode"] == "slide" and slide["eval"]["window"] == [8, 8] and slide["eval"]["stride"] == [5, 5]
    assert slide["miou"] != pytest.approx(whole["miou"], abs=1e-4)
    default = evaluate(compose_cfg("evaluate", overrides=voc_overrides(root, *common, "eval.mode=slide")))
    assert default["eval"]["window"] == [64, 64]  # debug=smoke's training crop
    cfg = compose_cfg("evaluate", overrides=voc_overrides(root, *common, "eval.mode=tiles"))
    expect_user_error(evaluate, cfg, capsys, "eval.mode=tiles", "whole", "slide")
