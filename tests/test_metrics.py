import math

import torch

from dmtc.metrics import make_miou_metric, per_class_iou, predicted_class, summarize


def test_miou_matches_hand_computed_confusion_matrix():
    # 4 classes; class 3 absent from prediction and target; 255 ignored.
    target = torch.tensor([[0, 0, 1, 1, 2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1, 2, 0, 3, 0]])
    # class 0: TP=2 (pos 0,7), FP=1 (pos 5), FN=1 (pos 1) -> 2/4
    # class 1: TP=2, FP=1 (pos 1), FN=0 -> 2/3
    # class 2: TP=1, FP=0, FN=1 (pos 5) -> 1/2
    # class 3: predicted only at an ignored pixel -> absent
    expected = [2 / 4, 2 / 3, 1 / 2]
    metric = make_miou_metric(4)
    metric.update(pred, target)
    assert math.isclose(float(metric.compute()), sum(expected) / 3, rel_tol=1e-6)
    iou = per_class_iou(metric.confmat)
    assert torch.allclose(iou[:3], torch.tensor(expected, dtype=torch.float64))
    assert torch.isnan(iou[3])
    summary = summarize(metric.confmat, ["a", "b", "c", "d"])
    assert math.isclose(summary["miou"], 100 * sum(expected) / 3, rel_tol=1e-5)
    assert summary["per_class_iou"]["d"] is None
    assert math.isclose(summary["per_class_iou"]["b"], 100 * 2 / 3, rel_tol=1e-5)


def test_class_only_predicted_counts_with_zero_iou():
    target = torch.tensor([[0, 0]])
    pred = torch.tensor([[0, 1]])
    summary = summarize(_confmat(pred, target, 3), ["a", "b", "c"])
    assert summary["per_class_iou"] == {"a": 50.0, "b": 0.0, "c": None}
    assert summary["miou"] == 25.0


def _confmat(pred, target, num_classes):
    metric = make_miou_metric(num_classes)
    metric.update(pred, target)
    return metric.confmat


def test_predicted_class_is_argmax_with_its_first_maximum_on_ties():
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(3, 5, 9, 11, generator=g) * 3).round()  # values in {0..3}: many ties
    scores[0, :, 0, 0] = 1.0  # all classes tie: class 0
    scores[1, 2, 1, 1] = float("nan")  # NaN counts as the maximum, as in argmax
    for s in (scores, scores.to(torch.bfloat16), scores.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(predicted_class(s), s.argmax(1))
    assert predicted_class(scores)[0, 0, 0] == 0 and predicted_class(scores)[1, 1, 1] == 2
    assert torch.equal(predicted_class(scores[0], dim=0), scores[0].argmax(0))
