"""Pseudo-label PNGs from background threads (dmtc.dmt.store_writer): the same bytes and record of names as
synchronous writes, a bounded queue, and errors that surface."""

import threading

import numpy as np
import pytest
import torch

from dmtc.dmt.store import PseudoLabelStore
from dmtc.dmt.store_writer import BackgroundStoreWriter


def _batches(seed=0, count=5, size=(3, 19, 27)):
    g = torch.Generator().manual_seed(seed)
    for b in range(count):
        labels = torch.randint(0, 12, size, generator=g).to(torch.uint8)
        codes = torch.randint(0, 65536, size, generator=g, dtype=torch.int32)
        sizes = [[size[1] - i, size[2] - 2 * i] for i in range(size[0])]
        yield [f"city{b % 2}/img_{b}_{i}" for i in range(size[0])], labels, codes, sizes


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_background_writes_equal_synchronous_writes_byte_for_byte(tmp_path):
    sync, background = PseudoLabelStore(tmp_path / "sync"), PseudoLabelStore(tmp_path / "bg")
    with BackgroundStoreWriter(background, threads=3, max_pending=2) as writer:
        for names, labels, codes, sizes in _batches():
            writer.submit(names, labels, codes, sizes)
            for i, name in enumerate(names):
                h, w = sizes[i]
                sync.write(name, labels[i, :h, :w].numpy(), codes[i, :h, :w].numpy().astype(np.uint16))
    assert background.written == sync.written  # submission order, not completion order
    assert _files(tmp_path / "bg") == _files(tmp_path / "sync") and len(_files(tmp_path / "sync")) == 30
    label, code = background.load_codes("city1/img_3_2")
    assert label.shape == code.shape == (17, 23)


def test_first_write_drops_an_old_manifest_before_any_file_changes(tmp_path):
    store = PseudoLabelStore(tmp_path)
    names, labels, codes, sizes = next(_batches())
    store.write(names[0], labels[0].numpy(), codes[0].numpy().astype(np.uint16))
    store.finalize({"m": 1})
    rewrite = PseudoLabelStore(tmp_path)
    with BackgroundStoreWriter(rewrite) as writer:
        writer.submit(names, labels, codes, sizes)
        assert not rewrite.manifest_path.exists()


def test_a_failed_write_surfaces_and_leaves_no_manifest(tmp_path):
    store = PseudoLabelStore(tmp_path)
    names, labels, codes, sizes = next(_batches())
    with pytest.raises(ValueError, match="H×W"):
        with BackgroundStoreWriter(store, threads=2) as writer:
            writer.submit(names, labels, codes[:, :, :5], sizes)  # codes narrower than the crop: shape mismatch
    assert not store.manifest_path.exists()
    with pytest.raises(ValueError, match="invalid pseudo-label name"):  # a bad name fails in the caller's thread
        with BackgroundStoreWriter(store) as writer:
            writer.submit(["../escape"], labels[:1], codes[:1], sizes[:1])


def test_the_queue_is_bounded(tmp_path):
    """With the writer threads stalled, submit blocks once ``max_pending`` images wait."""
    store = PseudoLabelStore(tmp_path)
    gate = threading.Event()
    original = store.write_reserved

    def stalled(*args):
        gate.wait(timeout=30)
        original(*args)

    store.write_reserved = stalled
    writer = BackgroundStoreWriter(store, threads=1, max_pending=2)
    names, labels, codes, sizes = next(_batches(size=(4, 8, 8)))
    done = threading.Event()

    def produce():
        writer.submit(names, labels, codes, sizes)
        done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    assert not done.wait(timeout=0.5)  # 4 images, room for 2: blocked
    assert len(store.written) == 3  # two queued, the third reserved and waiting for a slot
    gate.set()
    thread.join(timeout=30)
    writer.close()
    assert done.is_set() and len(list((tmp_path / "label").rglob("*.png"))) == 4
