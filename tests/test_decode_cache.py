"""The in-memory cache of decoded images and labels (dataset.ram_cache_mb): same arrays, never stale."""

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from dmtc.data import datasets
from dmtc.data.datasets import keep_decoded_in_memory, read_image, read_label
from dmtc.errors import DMTCError


@pytest.fixture
def cache_off_after():
    yield
    keep_decoded_in_memory(0)


def write_png(path, array, mtime_ns=None):
    assert cv2.imwrite(str(path), array)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def test_cached_reads_equal_decoding_and_are_private_copies(tmp_path, cache_off_after):
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", bgr)
    write_png(tmp_path / "l.png", rng.integers(0, 4, (12, 10), dtype=np.uint8))
    uncached = read_image(tmp_path / "a.png"), read_label(tmp_path / "l.png")
    keep_decoded_in_memory(1)
    first = read_image(tmp_path / "a.png"), read_label(tmp_path / "l.png")
    assert datasets._decoded.used == bgr.nbytes + 120
    first[0][:] = 0  # the caller's array is its own
    first[1][:] = 0
    second = read_image(tmp_path / "a.png"), read_label(tmp_path / "l.png", np.array([3, 2, 1, 0] + [255] * 252))
    assert np.array_equal(second[0], uncached[0]) and np.array_equal(second[0], bgr[..., ::-1])
    assert np.array_equal(second[1], 3 - uncached[1])  # the label map applies after the cache


def test_a_rewritten_file_is_decoded_again(tmp_path, cache_off_after):
    keep_decoded_in_memory(1)
    path = tmp_path / "a.png"
    write_png(path, np.full((4, 4, 3), 10, np.uint8), mtime_ns=1_000_000_000)
    assert read_image(path).max() == 10
    write_png(path, np.full((4, 4, 3), 20, np.uint8), mtime_ns=2_000_000_000)
    assert read_image(path).max() == 20
    path.write_bytes(b"not a png")
    with pytest.raises(DMTCError, match="missing or corrupt"):
        read_image(path)
    path.unlink()
    with pytest.raises(DMTCError, match="missing or corrupt"):
        read_image(path)


def test_the_least_recently_read_file_leaves_a_full_cache(tmp_path, cache_off_after):
    keep_decoded_in_memory(400 / 2**20)  # 400 bytes: two 8×8×3 images (192 B each) fit, not three
    for name in "abc":
        write_png(tmp_path / f"{name}.png", np.full((8, 8, 3), ord(name), np.uint8))
    cached = lambda: sorted(Path(key[0]).stem for key in datasets._decoded._arrays)  # noqa: E731
    read_image(tmp_path / "a.png"), read_image(tmp_path / "b.png"), read_image(tmp_path / "a.png")
    read_image(tmp_path / "c.png")  # b was read least recently
    assert cached() == ["a", "c"] and datasets._decoded.used == 384
    assert read_image(tmp_path / "b.png").max() == ord("b") and cached() == ["b", "c"]
    keep_decoded_in_memory(64 / 2**20)  # a budget smaller than one file: nothing is kept
    assert read_image(tmp_path / "a.png").max() == ord("a") and datasets._decoded.used == 0
    keep_decoded_in_memory(0)
    assert datasets._decoded is None


def test_pseudo_label_maps_are_read_through_the_cache(tmp_path, cache_off_after):
    from dmtc.dmt.store import PseudoLabelStore

    store = PseudoLabelStore(tmp_path / "store")
    label = np.arange(12, dtype=np.uint8).reshape(3, 4)
    code = (np.arange(12, dtype=np.uint16) * 5000).reshape(3, 4)
    for path, array in ((store.label_path("x"), label), (store.confidence_path("x"), code)):
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), array)
    keep_decoded_in_memory(1)
    first = store.load_codes("x")
    assert len(datasets._decoded._arrays) == 2 and datasets._decoded.used == label.nbytes + code.nbytes
    first[0][:] = 0
    again = store.load_codes("x")
    assert np.array_equal(again[0], label) and np.array_equal(again[1], code) and again[1].dtype == np.uint16
