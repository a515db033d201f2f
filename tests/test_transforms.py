"""Joint transforms keep image and label aligned; labels are never interpolated; padding is 255."""

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from dmtc.data.transforms import RandomScale, ToModelInput, build_eval_transform, build_train_transform

MEAN, STD = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]


def _pair(h=40, w=60):
    """An image whose red channel encodes the class of a label made of vertical bands (classes 0..5)."""
    label = np.repeat((np.arange(w) // 10).astype(np.uint8)[None, :], h, axis=0)
    image = np.zeros((3, h, w), dtype=np.uint8)
    image[0] = label * 40
    image[1] = 7
    return tv_tensors.Image(torch.from_numpy(image)), tv_tensors.Mask(torch.from_numpy(label))


def test_train_transform_keeps_alignment_and_label_values():
    torch.manual_seed(0)
    transform = build_train_transform(crop_size=[48, 48], scale_range=[0.5, 1.5], mean=MEAN, std=STD)
    for _ in range(30):
        image, label = transform(*_pair())
        assert image.shape == (3, 48, 48) and label.shape == (48, 48)
        assert image.dtype == torch.float32 and label.dtype == torch.int64
        values = set(label.unique().tolist())
        assert values <= {0, 1, 2, 3, 4, 5, 255}  # nearest: no interpolated label values
        inside = label != 255
        # where the image is padding (green channel 0), the label is 255, and vice versa
        assert torch.equal(image[1] > 0, inside)
        # away from class boundaries the (bilinear) image still encodes the label's class
        red = image[0][inside] * 255 / 40
        assert (red.round() == label[inside].float()).float().mean() > 0.8


def test_crop_pads_label_with_ignore_and_image_with_zero():
    transform = build_train_transform(crop_size=[80, 80], scale_range=[1.0, 1.0], mean=[0.1] * 3, std=STD, flip=False)
    image, label = transform(*_pair(40, 60))
    padded = label == 255
    assert padded.sum() == 80 * 80 - 40 * 60
    assert torch.all(image[:, padded] == 0)  # pad after normalisation: 0 = the mean colour


def test_flip_moves_image_and_label_together():
    transform = build_train_transform(crop_size=[40, 60], scale_range=[1.0, 1.0], mean=MEAN, std=STD)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        image, label = transform(*_pair())
        seen.add(int(label[0, 0]))
        assert torch.equal((image[0] * 255 / 40).round().long(), label)
    assert seen == {0, 5}  # both orientations occurred


def test_random_scale_range_and_validation():
    image, label = _pair(100, 100)
    torch.manual_seed(0)
    sizes = {RandomScale(0.5, 1.5)(image, label)[1].shape[0] for _ in range(30)}
    assert min(sizes) >= 50 and max(sizes) <= 150 and len(sizes) > 5
    with pytest.raises(ValueError):
        RandomScale(1.5, 0.5)


def test_caffe_style_input_is_bgr_0_255_minus_mean():
    image = tv_tensors.Image(torch.tensor([[[10]], [[20]], [[30]]], dtype=torch.uint8))
    out = ToModelInput([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], bgr=True, value_scale=1.0)(image)
    assert out.flatten().tolist() == [29.0, 18.0, 7.0]


def test_eval_transform_resizes_label_nearest():
    transform = build_eval_transform(base_size=[20, 30], mean=MEAN, std=STD)
    image, label = transform(*_pair(40, 60))
    assert image.shape == (3, 20, 30) and label.shape == (20, 30)
    assert set(label.unique().tolist()) <= {0, 1, 2, 3, 4, 5}
