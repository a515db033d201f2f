import math
import random

import pytest

from dmtc.data.splits import (
    dms_subset,
    dmt_split,
    num_labeled,
    parse_split,
    read_list,
    sbd_split,
    split_ratio,
    strip_template,
    write_list,
)
from dmtc.errors import DMTCError


def test_labeled_counts_follow_dmt_protocol():
    # Cityscapes (2975 train images) and VOC trainaug (10582), DESIGN §3.
    assert [num_labeled(2975, split_ratio(s)) for s in (2, 4, 8, 20, 30)] == [1487, 743, 371, 148, 100]
    assert [num_labeled(10582, split_ratio(s)) for s in (2, 4, 8, 20, 106, 50)] == [5291, 2645, 1322, 530, 100, 211]


def test_split_is_cumulative_shuffle_of_sorted_names():
    names = [f"img_{i:04d}" for i in range(200)]
    shuffled = list(reversed(names))  # input order must not matter
    expected = sorted(names)
    random.seed(7777)
    orders = []
    for _ in range(3):
        random.shuffle(expected)
        orders.append(list(expected))
    for sid in range(3):
        labeled, unlabeled = dmt_split(shuffled, 8, sid)
        assert len(labeled) == 26  # int(200 / 8) = 25 is 1 (mod 8): one more
        assert labeled == orders[sid][:26]
        assert unlabeled == orders[sid][26:]
        assert not set(labeled) & set(unlabeled)


def test_split_restores_global_random_state():
    random.seed(1)
    before = random.random()
    random.seed(1)
    dmt_split([str(i) for i in range(10)], 2, 0)
    assert random.random() == before


def test_bad_split_and_sid_are_clear_errors():
    with pytest.raises(DMTCError, match="split='abc'"):
        split_ratio("abc")
    with pytest.raises(DMTCError, match="sid=3"):
        dmt_split(["a", "b"], 2, 3)


def test_list_round_trip(tmp_path):
    write_list(tmp_path / "l" / "8_labeled_0.txt", ["a/b", "c"])
    assert read_list(tmp_path / "l" / "8_labeled_0.txt") == ["a/b", "c"]
    with pytest.raises(DMTCError, match="does not exist"):
        read_list(tmp_path / "missing.txt")


def test_list_lines_keep_their_first_token(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("/JPEGImages/a.jpg /SegmentationClassAug/a.png\n\n  b  \n")
    assert read_list(path) == ["/JPEGImages/a.jpg", "b"]
    assert strip_template("/JPEGImages/a.jpg", "JPEGImages/{name}.jpg", "train") == "a"
    assert strip_template("a", "JPEGImages/{name}.jpg", "train") == "a"
    city = "leftImg8bit/{subset}/{name}_leftImg8bit.png"
    assert strip_template("leftImg8bit/train/ulm/ulm_000001_000019_leftImg8bit.png", city, "train") == (
        "ulm/ulm_000001_000019")
    assert strip_template("ulm/ulm_000001_000019", city, "train") == "ulm/ulm_000001_000019"


def test_split_names():
    assert parse_split(8) == ("8", None) and parse_split("30") == ("30", None)
    assert parse_split("106-l") == ("106", "l") and parse_split("20-r") == ("20", "r")
    assert parse_split("SBD") == ("sbd", None)
    with pytest.raises(DMTCError, match="-l/-r"):
        parse_split("4-l")
    with pytest.raises(DMTCError, match="split='x-y'"):
        parse_split("x-y")


def _reference_dms(labeled_lists):
    """DMT's difference-maximized sampling written out loop by loop (DESIGN §3)."""
    random.seed(7777)
    out = {}
    for sid in range(3):
        for s in ("8", "20", "50", "106"):
            names = list(labeled_lists[(s, sid)])
            random.shuffle(names)
            nc = math.ceil(0.2 * len(names))
            out[(s, sid, "l")] = names[: len(names) - nc]
            out[(s, sid, "r")] = names[nc:]
    return out


def test_difference_maximized_sampling_matches_dmt():
    trainaug = [f"2008_{i:06d}" for i in range(10582)]
    splits = ("8", "20", "50", "106")
    lists = {(s, sid): dmt_split(trainaug, split_ratio(s), sid)[0] for sid in range(3) for s in splits}
    reference = _reference_dms(lists)
    random.seed(5)
    before = random.random()
    random.seed(5)
    for (s, sid, side), expected in reference.items():
        if s in ("106", "20") or sid == 1:
            assert dms_subset(lambda name, i: lists[(name, i)], s, sid, side) == expected
    assert random.random() == before  # global random state untouched
    left, right = reference[("106", 0, "l")], reference[("106", 0, "r")]
    assert len(left) == len(right) == 80 and len(set(left) & set(right)) == 60  # 100 labeled: 80% each, 60% shared
    assert set(left) | set(right) == set(lists[("106", 0)])


def test_sbd_split_counts():
    trainaug = [f"id{i:05d}" for i in range(10582)]
    train = trainaug[::7][:1464]
    labeled, unlabeled = sbd_split(train, trainaug)
    assert labeled == train and len(unlabeled) == 9118 and not set(labeled) & set(unlabeled)
