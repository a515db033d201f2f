"""Dynamic mutual loss (DMT §3): every branch of the weight rule, normalisation, ignore, gradients."""

import math

import torch
import torch.nn.functional as F

from dmtc.losses.mutual import dynamic_mutual_loss, dynamic_mutual_loss_with_stats

G1, G2 = 3.0, 5.0


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _logits(columns):
    """1×C×1×k logits from k per-pixel logit lists."""
    return torch.tensor(columns, dtype=torch.float64).T.reshape(1, len(columns[0]), 1, len(columns))


# Four pixels, C = 3, pseudo labels y and stored confidences q chosen to hit each branch:
#   0: argmax 0 == y=0                       -> p_y^G1
#   1: argmax 0 != y=1, max p > q = 0.1       -> 0
#   2: argmax 0 != y=1, max p <= q = 0.99     -> p_y^G2
#   3: ignored
COLUMNS = [[2.0, 0.5, -1.0], [1.5, 1.0, 0.0], [0.7, 0.2, 0.1], [3.0, -3.0, 0.0]]
LABELS = [0, 1, 1, 255]
CONF = [0.3, 0.1, 0.99, 0.5]


def _case():
    logits = _logits(COLUMNS).requires_grad_(True)
    labels = torch.tensor(LABELS).view(1, 1, 4)
    conf = torch.tensor(CONF, dtype=torch.float64).view(1, 1, 4)
    return logits, labels, conf


def _expected_weights():
    p = [_softmax(c) for c in COLUMNS]
    return [p[0][0] ** G1, 0.0, p[2][1] ** G2, 0.0]


def test_each_branch_by_hand():
    logits, labels, conf = _case()
    loss, stats = dynamic_mutual_loss_with_stats(logits, labels, conf, torch.tensor([True]), G1, G2)
    w = _expected_weights()
    ce = [-math.log(_softmax(COLUMNS[i])[LABELS[i]]) for i in range(3)]
    expected = sum(w[i] * ce[i] for i in range(3)) / 3  # 3 non-ignored pixels
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)
    assert math.isclose(stats["disagree_rate"].item(), 2 / 3, rel_tol=1e-6)
    assert math.isclose(stats["current_wins_rate"].item(), 1 / 3, rel_tol=1e-6)
    assert math.isclose(stats["mean_weight"].item(), sum(w) / 3, rel_tol=1e-6)
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in stats.values())


def test_tie_with_stored_confidence_keeps_gamma2_branch():
    # max p == q exactly is not "current more confident": weight p_y^G2.
    logits = _logits([[1.0, 0.0]])
    p = _softmax([1.0, 0.0])
    conf = torch.tensor([[[p[0]]]], dtype=torch.float64)
    loss = dynamic_mutual_loss(logits, torch.tensor([[[1]]]), conf, torch.tensor([True]), G1, G2)
    assert math.isclose(loss.item(), p[1] ** G2 * -math.log(p[1]), rel_tol=1e-12)


def _mixed_batch():
    # Sample 0 ground truth (2 valid pixels, 2 ignored), sample 1 pseudo (4 valid): denominator 6.
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 2, 2))
    labels[0, 0] = 255
    conf = torch.rand(2, 2, 2, dtype=torch.float64)
    return logits, labels, conf


def test_normalised_by_all_non_ignored_pixels_of_the_batch():
    # gamma1 = 0, gamma2 = 2: agreeing pixels weigh 1, current-model-wins pixels 0, the others p_y^2.
    logits, labels, conf = _mixed_batch()
    loss = dynamic_mutual_loss(logits, labels, conf, torch.tensor([False, True]), 0.0, 2.0)
    p = logits.softmax(1)
    p_max, pred = p.max(1)
    p_y = p.gather(1, labels.clamp(max=3).unsqueeze(1)).squeeze(1)
    disagree = pred[1] != labels[1]
    wins = disagree & (p_max[1] > conf[1])
    assert wins.any() and (disagree & ~wins).any()  # the case hits every branch
    w = torch.where(wins, 0.0, torch.where(disagree, p_y[1] ** 2, 1.0))
    ce = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    expected = (ce[0].sum() + (w * ce[1]).sum()) / 6
    assert torch.allclose(loss, expected)


def test_both_gammas_zero_is_plain_cross_entropy():
    # DMT's "without dynamic weighting": no pixel is skipped, also not where the current model wins.
    logits, labels, conf = _mixed_batch()
    is_pseudo = torch.tensor([False, True])
    p_max, pred = logits.softmax(1).max(1)
    assert ((pred[1] != labels[1]) & (p_max[1] > conf[1])).any()  # there is a current-wins pixel
    loss, stats = dynamic_mutual_loss_with_stats(logits, labels, conf, is_pseudo, 0.0, 0.0)
    assert torch.allclose(loss, F.cross_entropy(logits, labels, ignore_index=255))
    assert stats["mean_weight"].item() == 1.0
    assert stats["current_wins_rate"].item() > 0  # still reported as a diagnostic


def test_only_both_zero_is_special():
    # gamma1 = 0 alone keeps the rule: the current-wins pixel 1 of the hand case weighs 0.
    logits, labels, conf = _case()
    p = [_softmax(c) for c in COLUMNS]
    ce = [-math.log(p[i][LABELS[i]]) for i in range(3)]
    loss = dynamic_mutual_loss(logits, labels, conf, torch.tensor([True]), 0.0, G2)
    assert math.isclose(loss.item(), (ce[0] + p[2][1] ** G2 * ce[2]) / 3, rel_tol=1e-12)
    plain = dynamic_mutual_loss(logits, labels, conf, torch.tensor([True]), 0.0, 0.0)
    assert math.isclose(plain.item(), sum(ce) / 3, rel_tol=1e-12)


def test_ignored_pixels_contribute_nothing():
    logits, labels, conf = _case()
    loss = dynamic_mutual_loss(logits, labels, conf, torch.tensor([True]), G1, G2)
    loss.backward()
    assert torch.all(logits.grad[..., 3] == 0)
    other = logits.detach().clone()
    other[..., 3] = torch.tensor([-50.0, 40.0, 7.0]).view(1, 3, 1).double()
    assert torch.equal(dynamic_mutual_loss(other, labels, conf, torch.tensor([True]), G1, G2), loss.detach())


def test_labeled_samples_equal_plain_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 4, 6)
    labels = torch.randint(0, 5, (3, 4, 6))
    labels[:, :2, :3] = 255
    conf = torch.rand(3, 4, 6)
    is_pseudo = torch.zeros(3, dtype=torch.bool)
    loss, stats = dynamic_mutual_loss_with_stats(logits, labels, conf, is_pseudo, G1, G2)
    assert torch.allclose(loss, F.cross_entropy(logits, labels, ignore_index=255))
    assert all(v.item() == 0 for v in stats.values())


def test_gradient_does_not_flow_through_weights():
    logits, labels, conf = _case()
    loss = dynamic_mutual_loss(logits, labels, conf, torch.tensor([True]), G1, G2)
    loss.backward()
    # d/dz (w·CE) with w constant = w·(softmax(z) - onehot(y)); divided by 3 valid pixels.
    w = _expected_weights()
    manual = torch.zeros_like(logits)
    for i in range(3):
        p = torch.tensor(_softmax(COLUMNS[i]), dtype=torch.float64)
        p[LABELS[i]] -= 1
        manual[0, :, 0, i] = w[i] * p / 3
    assert torch.allclose(logits.grad, manual, atol=1e-12)


def test_no_valid_pixel_is_a_zero_that_keeps_the_graph():
    logits = torch.randn(2, 3, 2, 2, requires_grad=True)
    labels = torch.full((2, 2, 2), 255)
    loss, stats = dynamic_mutual_loss_with_stats(
        logits, labels, torch.rand(2, 2, 2), torch.tensor([True, False]), G1, G2
    )
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert torch.all(logits.grad == 0)
    assert all(v.item() == 0 and not torch.isnan(v) for v in stats.values())
