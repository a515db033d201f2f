"""Class-wise memory bank: FIFO rings, bounded per-call sampling, buffers/state_dict, DDP (gloo) sync."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dmtc.losses.memory_bank import ClassMemoryBank, select_pixels


def unit(x):
    return F.normalize(x, dim=1)


def test_fifo_order_and_bound():
    bank = ClassMemoryBank(num_classes=3, dim=4, size_per_class=5)
    rows = torch.randn(9, 4)
    bank.enqueue(rows[:3], torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(bank.get(0), unit(rows[:3]))
    assert bank.fill().tolist() == [3, 0, 0]
    bank.enqueue(rows[3:7], torch.zeros(4, dtype=torch.long))  # wraps: oldest two overwritten
    torch.testing.assert_close(bank.get(0), unit(rows[2:7]))
    assert bank.fill().tolist() == [5, 0, 0] and bank.ptr.tolist() == [2, 0, 0]
    bank.enqueue(rows[7:9], torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(bank.get(0), unit(rows[4:9]))
    assert bank.get(1).shape == (0, 4)


def test_one_call_with_more_rows_than_the_ring_keeps_the_newest_per_class():
    bank = ClassMemoryBank(num_classes=3, dim=4, size_per_class=4)
    rows = torch.randn(20, 4)
    labels = torch.tensor([0, 1, 2, 255, -1] * 4)  # out-of-range labels are dropped
    bank.enqueue(rows, labels)
    assert bank.fill().tolist() == [4, 4, 4]
    for c in range(3):
        torch.testing.assert_close(bank.get(c), unit(rows[labels == c]))
    bank.enqueue(rows[:7], torch.zeros(7, dtype=torch.long))  # 7 new rows of class 0 into a ring of 4
    torch.testing.assert_close(bank.get(0), unit(rows[3:7]))


def test_per_call_cap_samples_without_replacement_in_input_order():
    bank = ClassMemoryBank(num_classes=2, dim=3, size_per_class=10)
    rows = torch.arange(60, dtype=torch.float32).view(20, 3) + 1
    labels = torch.tensor([0] * 15 + [1] * 5)
    bank.enqueue(rows, labels, max_per_class=3, generator=torch.Generator().manual_seed(0))
    assert bank.fill().tolist() == [3, 3]
    stored = bank.get(0)
    candidates = unit(rows[:15])
    picked = [int(torch.cdist(s[None], candidates).argmin()) for s in stored]
    assert len(set(picked)) == 3 and picked == sorted(picked)
    other = ClassMemoryBank(num_classes=2, dim=3, size_per_class=10)
    other.enqueue(rows, labels, max_per_class=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(other.features, bank.features)
    seen = set()
    for seed in range(20):
        b = ClassMemoryBank(num_classes=2, dim=3, size_per_class=10)
        b.enqueue(rows, labels, max_per_class=3, generator=torch.Generator().manual_seed(seed))
        seen.add(tuple(b.get(0)[:, 0].tolist()))
    assert len(seen) > 10  # really random


def test_rows_are_detached_unit_vectors():
    bank = ClassMemoryBank(num_classes=2, dim=5, size_per_class=3)
    rows = (torch.randn(4, 5) * 7).requires_grad_(True)
    bank.enqueue(rows, torch.tensor([0, 1, 1, 0]))
    assert not bank.features.requires_grad
    torch.testing.assert_close(bank.get(1).norm(dim=1), torch.ones(2))


def test_size_zero_stores_nothing():
    bank = ClassMemoryBank(num_classes=3, dim=4, size_per_class=0)
    bank.enqueue(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), max_per_class=2)
    assert bank.fill().tolist() == [0, 0, 0]
    assert bank.get(2).shape == (0, 4)


def test_state_dict_round_trip(tmp_path):
    bank = ClassMemoryBank(num_classes=3, dim=4, size_per_class=5)
    bank.enqueue(torch.randn(17, 4), torch.randint(0, 3, (17,)))
    assert set(bank.state_dict()) == {"features", "ptr", "count"}
    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    fresh = ClassMemoryBank(num_classes=3, dim=4, size_per_class=5)
    fresh.load_state_dict(torch.load(tmp_path / "bank.pt"))
    for name in ("features", "ptr", "count"):
        assert torch.equal(getattr(fresh, name), getattr(bank, name))
    for c in range(3):
        assert torch.equal(fresh.get(c), bank.get(c))


def test_to_moves_the_buffers():
    bank = ClassMemoryBank(num_classes=3, dim=4, size_per_class=5)
    holder = torch.nn.Module()
    holder.bank = bank
    holder.to("meta")
    assert {b.device.type for b in bank.buffers()} == {"meta"}
    bank = ClassMemoryBank(num_classes=3, dim=4, size_per_class=5).to(torch.float64)
    assert bank.features.dtype == torch.float64 and bank.count.dtype == torch.long
    bank.enqueue(torch.randn(3, 4), torch.tensor([0, 1, 2]))  # input cast to the bank's dtype
    assert bank.fill().tolist() == [1, 1, 1]


def test_select_pixels_takes_valid_pixels_in_order():
    features = torch.randn(2, 4, 3, 5, requires_grad=True)
    labels = torch.randint(0, 3, (2, 3, 5))
    valid = torch.rand(2, 3, 5) > 0.4
    rows, lab = select_pixels(features, labels, valid)
    assert not rows.requires_grad
    torch.testing.assert_close(rows, features.detach().permute(0, 2, 3, 1)[valid])
    assert torch.equal(lab, labels[valid])


# ------------------------------------------------------------------ DDP
def _rank_rows(rank):
    g = torch.Generator().manual_seed(100 + rank)
    if rank == 0:
        labels = torch.tensor([0, 0, 0, 1, 2, 0, 255])
    else:
        labels = torch.tensor([1, 1, 3])  # shorter: exercises the padding; class 3 only on rank 1
    return torch.randn(labels.numel(), 6, generator=g), labels


def _ddp_worker(rank, world, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different global RNG per rank must not matter
        bank = ClassMemoryBank(num_classes=4, dim=6, size_per_class=3)
        rows, labels = _rank_rows(rank)
        bank.enqueue(rows, labels)  # no cap: all rows of every rank, rank order
        torch.save(bank.state_dict(), os.path.join(tmp, f"plain{rank}.pt"))
        g = torch.Generator().manual_seed(7 + rank)  # per-rank sampling, then all-gather
        bank.enqueue(rows * 2 + 1, labels, max_per_class=2, generator=g)
        bank.enqueue(rows[:0], labels[:0])  # a rank with nothing to add still joins the collective
        torch.save(bank.state_dict(), os.path.join(tmp, f"capped{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_end_with_identical_banks(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for name in ("plain", "capped"):
        s0 = torch.load(tmp_path / f"{name}0.pt")
        s1 = torch.load(tmp_path / f"{name}1.pt")
        for key in s0:
            assert torch.equal(s0[key], s1[key]), (name, key)
    # Without a cap the synced bank equals one process enqueuing rank 0's rows, then rank 1's.
    serial = ClassMemoryBank(num_classes=4, dim=6, size_per_class=3)
    (r0, l0), (r1, l1) = _rank_rows(0), _rank_rows(1)
    serial.enqueue(torch.cat([r0, r1]), torch.cat([l0, l1]))
    plain = torch.load(tmp_path / "plain0.pt")
    for key, value in serial.state_dict().items():
        assert torch.equal(plain[key], value), key
    assert plain["count"].tolist() == [3, 3, 1, 1]
    capped = torch.load(tmp_path / "capped0.pt")
    # Second call, cap 2 per rank per class: class 0 (4 rows on rank 0) adds 2, classes 2 and 3 add 1 each.
    assert capped["count"].tolist() == [3, 3, 2, 2]
