"""Regional contrastive loss (ReCo as in DMTC): masking, sampling, reduction, exact vs shared, memory bank."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dmtc.losses.memory_bank import ClassMemoryBank
from dmtc.losses.reco import (
    RecoSample,
    downsample_nearest,
    gather_keys,
    reco_loss,
    reco_loss_from_sample,
    sample_reco,
)

IGNORE = 255


def make_batch(seed=0, n=2, d=8, h=6, w=7, num_classes=4, ignore_frac=0.25, present=None):
    """Features (leaf, requires grad), labels with 255 where invalid, valid mask, softmax probs."""
    g = torch.Generator().manual_seed(seed)
    present = list(range(num_classes)) if present is None else present
    labels = torch.tensor(present)[torch.randint(len(present), (n, h, w), generator=g)]
    valid = torch.rand(n, h, w, generator=g) >= ignore_frac
    labels = torch.where(valid, labels, torch.full_like(labels, IGNORE))
    features = torch.randn(n, d, h, w, generator=g).requires_grad_(True)
    logits = torch.randn(n, num_classes, h, w, generator=g) * 2
    probs = torch.softmax(logits, dim=1)
    return features, labels, valid, probs


def gen(seed):
    return torch.Generator().manual_seed(seed)


def key_vector(features, sample, j):
    """The unit key vector of key index j, computed naively (no gradient)."""
    n, d, h, w = features.shape
    num_pixels = n * h * w
    if j < num_pixels:
        img, rest = divmod(j, h * w)
        v = features.detach()[img, :, rest // w, rest % w]
        return v / v.norm()
    return sample.bank_features[j - num_pixels]


def key_class(labels, sample, j):
    num_pixels = labels.numel()
    if j < num_pixels:
        return int(labels.reshape(-1)[j])
    return (j - num_pixels) // sample.bank_size_per_class


def slow_loss(features, sample: RecoSample, tau):
    """Per-query Python loop: CE over [q·p, q·n_1..M]/τ, positive at 0; Σ_c mean_q / K."""
    n, d, h, w = features.shape
    total = features.new_zeros(())
    num_anchor_classes, num_queries = sample.anchor_index.shape
    for a in range(num_anchor_classes):
        class_loss = features.new_zeros(())
        for i in range(num_queries):
            img, rest = divmod(int(sample.anchor_index[a, i]), h * w)
            q = features[img, :, rest // w, rest % w]
            q = q / q.norm()
            negs = sample.negative_index[a] if sample.negative_index.dim() == 2 else sample.negative_index[a, i]
            keys = [sample.positive[a]] + [key_vector(features, sample, int(j)) for j in negs]
            logits = torch.stack([q @ k for k in keys]) / tau
            class_loss = class_loss + F.cross_entropy(logits.unsqueeze(0), torch.zeros(1, dtype=torch.long))
        total = total + class_loss / num_queries
    return total / sample.num_classes_present


def manual_prototypes(features, labels, valid, num_classes):
    f = F.normalize(features.detach(), dim=1).permute(0, 2, 3, 1)[valid]
    lab = labels[valid]
    return torch.stack([F.normalize(f[lab == c].mean(0), dim=0) for c in range(num_classes)])


# ------------------------------------------------------------------ masking
@pytest.mark.parametrize("shared", [True, False])
def test_ignored_pixels_never_take_part(shared):
    features, labels, valid, probs = make_batch(seed=1)
    kwargs = dict(num_queries=16, num_negatives=12, shared_negatives=shared)
    loss = reco_loss(features, labels, valid, probs, generator=gen(5), **kwargs)
    (grad,) = torch.autograd.grad(loss, features)
    assert loss.item() > 0
    assert torch.all(grad.permute(0, 2, 3, 1)[~valid] == 0)

    # Change everything at ignored pixels: huge distinct features, real class ids (the reference bug
    # reads 255 as class 0), probabilities that would make them hard anchors.
    g = torch.Generator().manual_seed(99)
    inv = (~valid).unsqueeze(1)
    features2 = torch.where(inv, 1e4 * torch.randn(features.shape, generator=g), features.detach())
    features2.requires_grad_(True)
    labels2 = torch.where(valid, labels, torch.randint(0, 4, labels.shape, generator=g))
    probs2 = torch.where(inv, torch.full_like(probs, 0.25), probs)
    loss2 = reco_loss(features2, labels2, valid, probs2, generator=gen(5), **kwargs)
    (grad2,) = torch.autograd.grad(loss2, features2)
    assert torch.equal(loss, loss2)
    assert torch.equal(grad, grad2)


def test_sample_uses_only_valid_hard_anchors_and_other_class_negatives():
    features, labels, valid, probs = make_batch(seed=2)
    sample = sample_reco(features, labels, valid, probs, num_queries=64, num_negatives=64,
                         shared_negatives=False, generator=gen(0))
    flat_labels, flat_valid = labels.reshape(-1), valid.reshape(-1)
    own = probs.permute(0, 2, 3, 1).reshape(-1, 4)
    assert sample.negative_index.shape == (sample.anchor_class.numel(), 64, 64)
    for a, c in enumerate(sample.anchor_class.tolist()):
        idx = sample.anchor_index[a]
        assert flat_valid[idx].all() and (flat_labels[idx] == c).all()
        assert (own[idx, c] < 0.97).all()
        neg = sample.negative_index[a].reshape(-1)
        assert flat_valid[neg].all() and (flat_labels[neg] != c).all()


def test_invalid_label_on_valid_pixel_is_an_error():
    features, labels, valid, probs = make_batch(seed=2)
    with pytest.raises(ValueError, match="not valid"):
        reco_loss(features, labels, torch.ones_like(valid), probs)


# ------------------------------------------------------------------ reduction
def test_one_class_or_no_valid_pixel_gives_zero_with_grad_path():
    features, labels, valid, probs = make_batch(seed=3, present=[2])
    for v in (valid, torch.zeros_like(valid)):
        loss = reco_loss(features, labels, v, probs)
        assert loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, features)
        assert torch.all(grad == 0)


def test_class_without_hard_anchors_adds_zero_but_counts():
    features, labels, valid, probs = make_batch(seed=4, num_classes=3)
    # Class 2 is easy everywhere it is labeled: no hard anchors.
    easy = (labels == 2).unsqueeze(1)
    probs = torch.where(easy, torch.tensor([0.01, 0.01, 0.98]).view(1, 3, 1, 1), probs)
    sample = sample_reco(features, labels, valid, probs, num_queries=8, num_negatives=6, generator=gen(1))
    assert sample.num_classes_present == 3
    assert sample.anchor_class.tolist() == [0, 1]
    loss = reco_loss_from_sample(features, sample, 0.5)
    per_class_sum = slow_loss(features, sample, 0.5) * 3
    torch.testing.assert_close(loss, per_class_sum / 3)
    assert not torch.allclose(loss, per_class_sum / 2)


def test_gradients_reach_only_anchor_pixels():
    features, labels, valid, probs = make_batch(seed=5)
    sample = sample_reco(features, labels, valid, probs, num_queries=4, num_negatives=32, generator=gen(2))
    (grad,) = torch.autograd.grad(reco_loss_from_sample(features, sample, 0.5), features)
    touched = grad.abs().sum(1).reshape(-1) > 0
    anchors = torch.zeros_like(touched)
    anchors[sample.anchor_index.reshape(-1)] = True
    assert torch.equal(touched, anchors)  # keys (prototypes, negatives) are detached


# ------------------------------------------------------------------ exact formula
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("tau", [0.5, 0.04])  # 0.04 takes the generic logsumexp path
def test_vectorised_loss_matches_per_query_loop(shared, tau):
    features, labels, valid, probs = make_batch(seed=6)
    sample = sample_reco(features, labels, valid, probs, temperature=tau, num_queries=6, num_negatives=5,
                         shared_negatives=shared, generator=gen(3))
    loss = reco_loss_from_sample(features, sample, tau)
    (grad,) = torch.autograd.grad(loss, features)
    ref = slow_loss(features, sample, tau)
    (ref_grad,) = torch.autograd.grad(ref, features)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_exact_mode_in_small_blocks(monkeypatch):
    import dmtc.losses.reco as reco

    features, labels, valid, probs = make_batch(seed=6)
    sample = sample_reco(features, labels, valid, probs, num_queries=6, num_negatives=5,
                         shared_negatives=False, generator=gen(3))
    whole = reco_loss_from_sample(features, sample, 0.5)
    monkeypatch.setattr(reco, "_EXACT_BLOCK_ELEMENTS", 7)  # one query row per block
    torch.testing.assert_close(reco_loss_from_sample(features, sample, 0.5), whole)


def test_prototypes_are_normalised_means_of_normalised_valid_features():
    features, labels, valid, probs = make_batch(seed=7)
    sample = sample_reco(features, labels, valid, probs, num_queries=4, num_negatives=4, generator=gen(4))
    protos = manual_prototypes(features, labels, valid, 4)
    torch.testing.assert_close(sample.positive, protos[sample.anchor_class])


def test_negative_classes_follow_prototype_similarity_softmax():
    tau = 0.5
    features, labels, valid, probs = make_batch(seed=8, n=2, h=8, w=8)
    sample = sample_reco(features, labels, valid, probs, temperature=tau, num_queries=1, num_negatives=40000,
                         generator=gen(5))
    protos = manual_prototypes(features, labels, valid, 4)
    flat_labels = labels.reshape(-1)
    for a, c in enumerate(sample.anchor_class.tolist()):
        others = [k for k in range(4) if k != c]
        expected = torch.softmax(torch.stack([protos[c] @ protos[k] for k in others]) / tau, 0)
        drawn = flat_labels[sample.negative_index[a]]
        freq = torch.stack([(drawn == k).float().mean() for k in others])
        torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_negatives_are_uniform_within_their_class():
    features, labels, valid, probs = make_batch(seed=9, num_classes=2)
    sample = sample_reco(features, labels, valid, probs, num_queries=1, num_negatives=30000, generator=gen(6))
    a = 0
    c_other = 1 - int(sample.anchor_class[a])
    members = ((labels.reshape(-1) == c_other) & valid.reshape(-1)).nonzero().squeeze(1)
    counts = torch.bincount(sample.negative_index[a], minlength=labels.numel())[members].float()
    expected = 30000 / members.numel()
    assert counts.min() > 0
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected)


@pytest.fixture
def one_thread():
    """Hundreds of tiny calls: one intra-op thread avoids thread-pool overhead on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_shared_and_exact_modes_agree_in_expectation(one_thread):
    features, labels, valid, probs = make_batch(seed=10, n=2, d=8, h=8, w=8)
    runs = 200
    kwargs = dict(num_queries=16, num_negatives=8, temperature=0.5)
    losses = {True: [], False: []}
    grads = {True: torch.zeros_like(features), False: torch.zeros_like(features)}
    for shared in (True, False):
        for seed in range(runs):
            loss = reco_loss(features, labels, valid, probs, shared_negatives=shared, generator=gen(seed), **kwargs)
            (g,) = torch.autograd.grad(loss, features)
            losses[shared].append(loss.item())
            grads[shared] += g / runs
    shared_l, exact_l = torch.tensor(losses[True]), torch.tensor(losses[False])
    # Same seed → same anchors in both modes; only the negatives differ, so compare the paired difference.
    diff = shared_l - exact_l
    stderr = diff.std() / math.sqrt(runs)
    assert abs(diff.mean()) < 4 * stderr + 1e-6
    # The per-draw spread of the shared mode is larger (correlated negatives), but not the mean.
    rel = (grads[True] - grads[False]).norm() / grads[False].norm()
    assert rel < 0.1


# ------------------------------------------------------------------ memory bank
def test_empty_bank_equals_batch_mode_exactly():
    features, labels, valid, probs = make_batch(seed=11)
    kwargs = dict(num_queries=16, num_negatives=12)
    for shared in (True, False):
        ref = reco_loss(features, labels, valid, probs, shared_negatives=shared, generator=gen(7), **kwargs)
        (ref_grad,) = torch.autograd.grad(ref, features)
        for bank in (ClassMemoryBank(4, 8, 0), ClassMemoryBank(4, 8, 10)):
            for bank_prototypes in (False, True):
                loss = reco_loss(features, labels, valid, probs, memory=bank, shared_negatives=shared,
                                 generator=gen(7), bank_prototypes=bank_prototypes, **kwargs)
                (grad,) = torch.autograd.grad(loss, features)
                assert torch.equal(loss, ref)
                assert torch.equal(grad, ref_grad)


def test_bank_supplies_negatives_from_a_class_absent_in_the_batch():
    features, labels, valid, probs = make_batch(seed=12, present=[0, 1])
    bank = ClassMemoryBank(4, 8, 10)
    g = torch.Generator().manual_seed(0)
    bank.enqueue(torch.randn(6, 8, generator=g), torch.full((6,), 3))
    for shared in (True, False):
        sample = sample_reco(features, labels, valid, probs, num_queries=8, num_negatives=200, memory=bank,
                             shared_negatives=shared, generator=gen(8))
        assert sample.num_classes_present == 2  # the denominator counts batch classes only
        neg = sample.negative_index.reshape(-1)
        classes = {key_class(labels, sample, int(j)) for j in neg}
        assert 3 in classes and 2 not in classes
        assert set(sample.anchor_class.tolist()) == {0, 1}
        # Bank keys are the bank's rows; the loss still matches the per-query loop.
        torch.testing.assert_close(gather_keys(sample, neg[:50]),
                                   torch.stack([key_vector(features, sample, int(j)) for j in neg[:50]]))
    small = sample_reco(features, labels, valid, probs, num_queries=4, num_negatives=5, memory=bank,
                        shared_negatives=False, generator=gen(8))
    torch.testing.assert_close(reco_loss_from_sample(features, small, 0.5), slow_loss(features, small, 0.5))


def test_one_batch_class_with_bank_classes_gives_a_loss():
    features, labels, valid, probs = make_batch(seed=13, present=[1])
    bank = ClassMemoryBank(4, 8, 5)
    bank.enqueue(torch.randn(4, 8), torch.tensor([0, 0, 2, 3]))
    assert reco_loss(features, labels, valid, probs).item() == 0.0
    loss = reco_loss(features, labels, valid, probs, memory=bank, generator=gen(0))
    assert loss.item() > 0
    (grad,) = torch.autograd.grad(loss, features)
    assert grad.abs().sum() > 0


def test_bank_prototypes_average_batch_and_bank():
    features, labels, valid, probs = make_batch(seed=14)
    bank = ClassMemoryBank(4, 8, 5)
    bank_rows = torch.randn(7, 8)
    bank_labels = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    bank.enqueue(bank_rows, bank_labels)
    sample = sample_reco(features, labels, valid, probs, num_queries=4, num_negatives=4, memory=bank,
                         generator=gen(9), bank_prototypes=True)
    f = F.normalize(features.detach(), dim=1).permute(0, 2, 3, 1)[valid]
    lab = labels[valid]
    unit_bank = F.normalize(bank_rows, dim=1)
    for a, c in enumerate(sample.anchor_class.tolist()):
        expected = F.normalize(torch.cat([f[lab == c], unit_bank[bank_labels == c]]).mean(0), dim=0)
        torch.testing.assert_close(sample.positive[a], expected)
    batch_only = sample_reco(features, labels, valid, probs, num_queries=4, num_negatives=4, memory=bank,
                             generator=gen(9))
    protos = manual_prototypes(features, labels, valid, 4)
    torch.testing.assert_close(batch_only.positive, protos[batch_only.anchor_class])


def test_raw_prototypes_are_the_mean_of_raw_features_as_reco():
    features, labels, valid, probs = make_batch(seed=16)
    features = features * torch.rand(features.shape[0], 1, *features.shape[2:]) * 5  # norms differ per pixel
    raw = sample_reco(features, labels, valid, probs, num_queries=4, num_negatives=4, generator=gen(3),
                      raw_prototypes=True)
    unit = sample_reco(features, labels, valid, probs, num_queries=4, num_negatives=4, generator=gen(3))
    f = features.detach().permute(0, 2, 3, 1)[valid]
    lab = labels[valid]
    for a, c in enumerate(raw.anchor_class.tolist()):  # cosine keys: the normalised mean of raw features
        torch.testing.assert_close(raw.positive[a], F.normalize(f[lab == c].mean(0), dim=0))
    assert not torch.allclose(raw.positive, unit.positive, atol=1e-4)


# ------------------------------------------------------------------ misc
def test_same_generator_seed_is_reproducible_and_seeds_differ():
    features, labels, valid, probs = make_batch(seed=15)
    a = reco_loss(features, labels, valid, probs, num_queries=8, num_negatives=8, generator=gen(1))
    b = reco_loss(features, labels, valid, probs, num_queries=8, num_negatives=8, generator=gen(1))
    c = reco_loss(features, labels, valid, probs, num_queries=8, num_negatives=8, generator=gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(reco_loss(features, labels, valid, probs))  # global RNG when no generator


def test_low_precision_features_give_float32_loss_and_matching_grad_dtype():
    features, labels, valid, probs = make_batch(seed=16)
    half = features.detach().to(torch.bfloat16).requires_grad_(True)
    loss = reco_loss(half, labels, valid, probs, num_queries=8, num_negatives=8, generator=gen(0))
    ref = reco_loss(half.detach().float(), labels, valid, probs, num_queries=8, num_negatives=8, generator=gen(0))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    (grad,) = torch.autograd.grad(loss, half)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()


def test_loss_under_autocast_is_float32_and_equals_the_float32_loss():
    # bf16-mixed training: the projection head's features arrive in bf16 and autocast is active around the
    # loss. Prototypes, similarities and the InfoNCE sum must stay float32 (a bf16 prototype met a float32
    # query in one bmm and DMTC under AMP crashed).
    features, labels, valid, probs = make_batch(seed=17)
    half = features.detach().to(torch.bfloat16).requires_grad_(True)
    kwargs = {"num_queries": 8, "num_negatives": 8}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = reco_loss(half, labels, valid, probs.to(torch.bfloat16), generator=gen(0), **kwargs)
    ref = reco_loss(half.detach().float(), labels, valid, probs.to(torch.bfloat16).float(), generator=gen(0),
                    **kwargs)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    (grad,) = torch.autograd.grad(loss, half)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gradient_of_channels_last_features_equals_the_contiguous_one():
    features, labels, valid, probs = make_batch(seed=18)
    nhwc = features.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    grads = []
    for f in (features, nhwc):
        sample = sample_reco(f, labels, valid, probs, num_queries=6, num_negatives=5, generator=gen(4))
        grads.append(torch.autograd.grad(reco_loss_from_sample(f, sample, 0.5), f)[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_downsample_nearest_picks_one_source_pixel_for_all_three():
    n, num_classes, big_h, big_w = 2, 3, 12, 20
    labels = torch.randint(0, num_classes, (n, big_h, big_w))
    labels[:, :, :3] = IGNORE
    valid = labels != IGNORE
    # Encode each source pixel's position in its probabilities to check the three picks agree.
    pos = torch.arange(big_h * big_w, dtype=torch.float32).view(1, 1, big_h, big_w).expand(n, num_classes, -1, -1)
    small_labels, small_valid, small_probs = downsample_nearest(labels, valid, pos.clone(), (3, 5))
    assert small_labels.shape == (n, 3, 5) and small_labels.dtype == labels.dtype
    assert small_valid.dtype == torch.bool and small_probs.shape == (n, num_classes, 3, 5)
    src = small_probs[:, 0].long()
    torch.testing.assert_close(small_labels, labels.reshape(n, -1).gather(1, src.reshape(n, -1)).view(n, 3, 5))
    torch.testing.assert_close(small_valid, valid.reshape(n, -1).gather(1, src.reshape(n, -1)).view(n, 3, 5))
    assert torch.equal(small_valid, small_labels != IGNORE)
