import random

import pytest

from dmtc.data.splits import dmt_split, num_labeled, read_list, split_ratio, write_list
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
