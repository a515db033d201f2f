"""Pseudo labels in one pass: histogram thresholds (DMT §3 curriculum), the on-disk store, prediction."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dmtc.dmt.curriculum import ConfidenceHistogram, apply_thresholds
from dmtc.dmt.labeling import predict_to_store
from dmtc.dmt.scores import confidence_score, confidence_to_score, quantize_score, score_to_confidence
from dmtc.dmt.store import PseudoLabelStore
from dmtc.errors import DMTCError

RATIOS = (0.05, 0.2, 0.4, 0.6, 0.8)


def _random_pixels(n=60_000, classes=5, seed=0):
    """Scores of max-softmax-like confidences in [1/C, 1], more saturated for higher classes (some beyond
    float32's 1 - 6e-8, where only the score still ranks them), at the store's precision."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    one_minus_p = (1 - 1 / classes) * torch.rand(n, generator=g, dtype=torch.float64) ** (1 + 4 * labels.double())
    return labels, quantize_score(-torch.log(one_minus_p))[1]


@pytest.mark.parametrize("bins", [4096, 65536])
def test_thresholds_match_exact_order_statistic_and_keep_at_least_ratio(bins):
    labels, conf = _random_pixels()
    if bins == 4096:  # unquantised scores: the bound must hold without the store's codes too
        p = 1 - 0.8 * torch.rand(conf.shape, generator=torch.Generator().manual_seed(3)) ** 2
        conf = confidence_to_score(p)
    hist = ConfidenceHistogram(5, bins=bins)
    hist.update(labels.view(10, 60, 100), conf.view(10, 60, 100))
    assert torch.equal(hist.predicted(), torch.bincount(labels, minlength=5))
    for ratio in RATIOS:
        t = hist.thresholds(ratio)
        kept = hist.kept(t)
        for c in range(5):
            values = conf[labels == c].sort(descending=True).values
            n = values.numel()
            k = math.ceil(ratio * n)
            exact = values[k - 1].item()  # k-th largest confidence
            b = int(torch.searchsorted(hist.edges, t[c:c + 1], right=True)) - 1  # t is bin b's lower edge
            upper = hist.edges[b + 1].item() if b + 1 < bins else float("inf")
            assert hist.edges[b].item() == t[c].item() <= exact < upper
            # threshold error in confidence <= one bin; the default bins meet the 1e-3 bound
            error = abs(score_to_confidence(t[c]).item() - score_to_confidence(torch.tensor(exact)).item())
            one_bin = score_to_confidence(torch.tensor(upper)).item() - score_to_confidence(t[c]).item()
            assert error <= (1e-3 if bins == 65536 else one_bin)
            actual = int((values >= t[c]).sum())
            assert actual == kept[c].item()
            in_bin = int(((values >= t[c]) & (values < upper)).sum())
            assert k <= actual < k + in_bin
            if bins == 65536:  # one bin per stored code: exact, extra pixels only ties
                assert t[c].item() == exact
                assert actual == int((values >= exact).sum())


def test_ratio_one_keeps_everything():
    labels, conf = _random_pixels(seed=1)
    hist = ConfidenceHistogram(5)
    hist.update(labels, conf)
    t = hist.thresholds(1.0)
    assert torch.all(t == 0)
    assert torch.equal(hist.kept(t), hist.predicted())
    with pytest.raises(ValueError):
        hist.thresholds(0.0)


def test_class_nobody_predicts_and_class_with_one_pixel():
    hist = ConfidenceHistogram(4)
    labels = torch.tensor([0, 0, 0, 0, 2, 255, -1])  # class 1 and 3 never predicted; 255/-1 skipped
    conf = quantize_score(confidence_to_score(torch.tensor([0.9, 0.8, 0.7, 0.6, 0.33, 0.99, 0.99])))[1]
    hist.update(labels, conf)
    assert hist.predicted().tolist() == [4, 0, 1, 0]
    for ratio in (1e-6, 0.3, 1.0):
        t = hist.thresholds(ratio)
        assert math.isinf(t[1]) and math.isinf(t[3])
        assert t[2] <= conf[4]  # the single pixel is kept for any ratio > 0
        assert hist.kept(t).tolist()[1:] == [0, 1, 0]
    # 0.5 of 4 pixels -> the top 2 (0.9, 0.8): 0.7 falls below the threshold.
    assert 0.7 < score_to_confidence(hist.thresholds(0.5)[0]) <= 0.8 + 1e-4  # stored codes: within 3e-5


def test_saturated_confidences_still_keep_the_requested_fraction():
    """Pixels whose softmax rounds to 1.0 in float32 (logit margins 17..300: untrained or overconfident
    models) stay ranked by their score, so r = 0.4 keeps 40% of them, not all (a linear 16-bit code of p
    would put them in one bin)."""
    margins = torch.linspace(17.0, 300.0, 1000)
    logits = torch.stack([margins, torch.zeros_like(margins)])[None, :, :, None]  # 1×2×1000×1
    assert torch.all(logits.softmax(1).max(1).values == 1.0)
    label, score = confidence_score(logits)
    assert torch.all(label == 0) and torch.allclose(score, margins.view(1, -1, 1), rtol=1e-6, atol=1e-4)
    hist = ConfidenceHistogram(2)
    hist.update(label, quantize_score(score)[1])
    assert hist.kept(hist.thresholds(0.4))[0].item() == 400


def test_histogram_merge_state_dict_and_all_reduce_without_distributed():
    labels, conf = _random_pixels(n=20_000, seed=2)
    whole, part_a, part_b = ConfidenceHistogram(5), ConfidenceHistogram(5), ConfidenceHistogram(5)
    whole.update(labels, conf)
    part_a.update(labels[:7_000], conf[:7_000])
    part_b.update(labels[7_000:], conf[7_000:])
    part_a.merge(part_b)
    part_a.all_reduce()  # not initialised: no-op
    assert torch.equal(part_a.counts, whole.counts)
    restored = ConfidenceHistogram(5)
    restored.load_state_dict(whole.state_dict())
    assert torch.equal(restored.thresholds(0.4), whole.thresholds(0.4))
    assert torch.equal(ConfidenceHistogram.from_counts(whole.counts.numpy()).counts, whole.counts)


def test_apply_thresholds_numpy_and_torch():
    label = np.array([[0, 1, 2], [255, 0, 1]], dtype=np.uint8)
    conf = np.array([[0.5, 0.2, 0.9], [0.0, 0.4, 0.7]], dtype=np.float32)
    t = [0.45, 0.3, math.inf]
    expected = np.array([[0, 255, 255], [255, 255, 1]], dtype=np.uint8)
    out = apply_thresholds(label, conf, t)
    assert out.dtype == np.uint8 and np.array_equal(out, expected)
    assert label[0, 1] == 1  # input untouched
    out_t = apply_thresholds(torch.from_numpy(label).long(), torch.from_numpy(conf), torch.tensor(t))
    assert torch.equal(out_t, torch.from_numpy(expected).long())


# -- store -----------------------------------------------------------------------------------------------
META = {"model": "A", "phase": 1, "ratio": 0.2, "num_images": 2, "thresholds": [0.5, math.inf]}


def _fill(store, names=("aachen/aachen_000000_000019", "bochum/bochum_000000_000313"), seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    for name in names:
        label = rng.integers(0, 19, (17, 23)).astype(np.uint8)
        label[0, 0] = 255
        conf = rng.random((17, 23)).astype(np.float32)
        conf[0, :3] = [0.0, 1.0, 0.5]
        store.write(name, label, conf)
        data[name] = (label, conf)
    return data


def test_store_round_trip_with_subfolders(tmp_path):
    store = PseudoLabelStore(tmp_path / "store")
    data = _fill(store)
    store.finalize(META)
    assert store.is_complete(META) and store.is_complete({"phase": 1})
    assert (tmp_path / "store/label/aachen/aachen_000000_000019.png").is_file()
    assert (tmp_path / "store/confidence/bochum/bochum_000000_000313.png").is_file()
    assert store.names() == sorted(data)
    reopened = PseudoLabelStore(tmp_path / "store")
    for name, (label, conf) in data.items():
        got_label, got_conf = reopened.load(name)
        assert got_label.dtype == np.uint8 and np.array_equal(got_label, label)
        assert got_conf.dtype == np.float32  # scores -log(1 - p); half a code step is 2.4e-4 in score
        assert np.abs(score_to_confidence(got_conf) - conf).max() <= 2.5e-4
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(ValueError):
        store.write("../escape", data[name][0], data[name][1])


def test_store_with_histogram(tmp_path):
    store = PseudoLabelStore(tmp_path)
    _fill(store)
    hist = ConfidenceHistogram(3, bins=16)
    hist.update(torch.tensor([0, 1, 1]), torch.tensor([0.1, 0.5, 0.95]))
    store.finalize(META, histogram=hist)
    assert json.loads((tmp_path / "manifest.json").read_text())["histogram"] == "histogram.npz"
    assert torch.equal(store.load_histogram().counts, hist.counts)
    (tmp_path / "histogram.npz").unlink()
    assert not store.is_complete(META)


def test_incomplete_or_mismatched_store_is_not_trusted(tmp_path):
    store = PseudoLabelStore(tmp_path)
    data = _fill(store)
    assert not store.is_complete(META)  # no manifest yet
    store.finalize(META)
    assert not store.is_complete({**META, "phase": 2})
    assert not store.is_complete({**META, "thresholds": [0.5, 0.6]})
    assert not store.is_complete({"unknown_key": 1})
    # Rewriting a finalized store drops its manifest at the first write: half-rewritten is untrusted.
    PseudoLabelStore(tmp_path).write("new/image", *data["aachen/aachen_000000_000019"])
    assert not store.is_complete(META)
    store.finalize(META, names=sorted(data))
    assert store.is_complete(META)
    store.confidence_path("bochum/bochum_000000_000313").unlink()  # a file lost after finalize
    assert not store.is_complete(META)
    with pytest.raises(DMTCError):
        store.finalize(META, names=sorted(data))


def test_interrupted_write_is_not_trusted_and_clear_removes_it(tmp_path):
    root = tmp_path / "store"
    store = PseudoLabelStore(root)
    _fill(store)
    # A crash mid-write: a stray temp file and no manifest.
    (root / "label/aachen/.aachen_000000_000042.png.123.abc.tmp").write_bytes(b"partial")
    (root / "unrelated.txt").write_text("keep me")
    assert not PseudoLabelStore(root).is_complete({})
    (root / "manifest.json").write_text('{"names": ["aachen/aachen_0')  # truncated manifest
    assert not PseudoLabelStore(root).is_complete({})
    store.clear()
    assert sorted(p.name for p in root.iterdir()) == ["unrelated.txt"]
    (root / "unrelated.txt").unlink()
    PseudoLabelStore(root).clear()
    assert not root.exists()


def test_corrupt_png_raises_dmtc_error_naming_the_file(tmp_path):
    store = PseudoLabelStore(tmp_path)
    data = _fill(store)
    store.finalize(META)
    name = "aachen/aachen_000000_000019"
    path = store.confidence_path(name)
    path.write_bytes(path.read_bytes()[:40])  # truncated PNG
    with pytest.raises(DMTCError, match="aachen_000000_000019.png") as err:
        store.load(name)
    assert str(path) in str(err.value) and "delete" in str(err.value)
    store.label_path(name).write_bytes(b"not a png at all")
    with pytest.raises(DMTCError, match=str(store.label_path(name))):
        store.load(name)
    assert store.load("bochum/bochum_000000_000313")[0].shape == data["bochum/bochum_000000_000313"][0].shape


# -- predict_to_store ------------------------------------------------------------------------------------
class TinySegmenter(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 3, stride=8, padding=1)

    def forward(self, x):
        return {"logits": self.conv(x)}


class PaddedImages(Dataset):
    """Images of different sizes padded bottom/right to 40×56."""

    sizes = [(40, 56), (33, 50), (25, 56), (40, 17), (9, 9)]

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        image = torch.zeros(3, 40, 56)
        h, w = self.sizes[i]
        image[:, :h, :w] = torch.randn(3, h, w, generator=g)
        return {"image": image, "name": f"city{i % 2}/img_{i}", "size": torch.tensor([h, w])}


def test_predict_to_store_writes_every_image_and_counts_every_pixel(tmp_path):
    torch.manual_seed(0)
    model = TinySegmenter().train()
    loader = DataLoader(PaddedImages(), batch_size=2)
    store = PseudoLabelStore(tmp_path / "A")
    hist = ConfidenceHistogram(4)
    names = predict_to_store(model, loader, store, hist, "cpu")
    assert model.training
    assert sorted(names) == sorted(f"city{i % 2}/img_{i}" for i in range(5))
    assert hist.counts.sum().item() == sum(h * w for h, w in PaddedImages.sizes)
    store.finalize({"model": "A"}, histogram=hist)
    assert store.is_complete({"model": "A"})

    model.eval()
    dataset = PaddedImages()
    counts = torch.zeros(4, dtype=torch.int64)
    for i in range(len(dataset)):
        item = dataset[i]
        h, w = item["size"].tolist()
        with torch.no_grad():
            logits = model(item["image"][None])["logits"]
        up = F.interpolate(logits, size=(40, 56), mode="bilinear", align_corners=False)
        conf, label = up.softmax(1)[0, :, :h, :w].max(0)
        score = confidence_score(up)[1][0, :h, :w]
        got_label, got_score = store.load(item["name"])
        assert got_label.shape == (h, w)
        assert np.array_equal(got_label, label.numpy())
        assert (np.abs(got_score - score.numpy()) <= (score.numpy() + 0.1) * 1e-4 + 1e-5).all()  # half a code
        assert np.abs(score_to_confidence(got_score) - conf.numpy()).max() <= 2.5e-4
        counts += torch.bincount(label.flatten(), minlength=4)
    assert torch.equal(hist.predicted(), counts)
    # Thresholds from the histogram agree exactly with the stored confidences.
    t = hist.thresholds(0.5)
    kept = torch.zeros(4, dtype=torch.int64)
    for name in names:
        label, conf = store.load(name)
        out = apply_thresholds(label, conf, t)
        kept += torch.bincount(torch.from_numpy(out[out != 255]).long(), minlength=4)
    assert torch.equal(kept, hist.kept(t))


def _all_reduce_worker(rank, world_size, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        hist = ConfidenceHistogram(3, bins=8)
        hist.update(torch.tensor([rank, 2]), torch.tensor([5.0, 1000.0]))  # 8 bins: 5.0 in bin 2, 1000 in 7
        hist.all_reduce()
        torch.save(hist.counts, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_single_rank_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        hist = ConfidenceHistogram(3, bins=8)
        hist.update(torch.tensor([0, 2, 2]), torch.tensor([0.5, 1.0, 0.0]))
        before = hist.counts.clone()
        hist.all_reduce()
        assert torch.equal(hist.counts, before) and hist.counts.device.type == "cpu"
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_across_ranks(tmp_path):
    torch.multiprocessing.spawn(_all_reduce_worker, args=(2, tmp_path / "init", tmp_path), nprocs=2)
    expected = torch.zeros(3, 8, dtype=torch.int64)
    edges = ConfidenceHistogram(3, bins=8).edges
    assert edges[2] <= 5.0 < edges[3] and edges[7] == 1000.0
    expected[0, 2] = expected[1, 2] = 1
    expected[2, 7] = 2
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"{rank}.pt"), expected)
