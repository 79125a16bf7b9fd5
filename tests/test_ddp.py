"""Data sharding across DDP ranks, and a real 2-process CPU (gloo) training run under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cal_core import checkpoint
from cal_core.distributed import EpochBatchSampler, pick_device
from tests.train_fixtures import build_tiny_shards


@pytest.mark.parametrize(("n", "batch", "world"), [(40, 8, 2), (41, 8, 2), (17, 4, 3), (33, 16, 2), (5, 32, 1), (7, 2, 4), (8, 1, 4)])
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


@pytest.mark.parametrize(("world", "batch"), [(1, 4), (2, 4), (3, 2)])
def test_windows_of_shards_cover_every_sample_and_load_each_shard_once(world: int, batch: int) -> None:
    """Shard sizes 7, 5, 9, 4, 6 and a cache of 2 shards: each rank's order reads each shard at most once."""
    starts = [0, 7, 12, 21, 25, 31]
    shard_of = {i: s for s in range(5) for i in range(starts[s], starts[s + 1])}
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            sampler = EpochBatchSampler(31, batch, rank, world, seed=4, blocks=starts, window=2)
            sampler.set_epoch(epoch)
            order = [i for b in sampler for i in b]
            seen += order
            cache: list[int] = []  # an LRU of 2 shards, as the dataset keeps
            loads = 0
            for i in order:
                if shard_of[i] in cache:
                    cache.remove(shard_of[i])
                else:
                    loads += 1
                cache = (cache + [shard_of[i]])[-2:]
            assert loads <= 5, (rank, loads)
        assert sorted(seen) == list(range(31))


def test_a_window_holding_every_shard_is_the_uniform_shuffle() -> None:
    plain, windowed = EpochBatchSampler(31, 4, seed=4), EpochBatchSampler(31, 4, seed=4, blocks=[0, 9, 31], window=2)
    for sampler in (plain, windowed):
        sampler.set_epoch(3)
    assert list(plain) == list(windowed)
    with pytest.raises(ValueError, match="blocks must run from 0 to 31"):
        EpochBatchSampler(31, 4, blocks=[0, 9, 30], window=1)


def test_skip_resumes_inside_an_epoch() -> None:
    sampler = EpochBatchSampler(50, 10, seed=2)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, skip=2)
    assert list(sampler) == full[2:]
    assert len(sampler) == len(full) - 2


def test_device_choice() -> None:
    assert pick_device("cpu", 0) == torch.device("cpu")
    if torch.cuda.is_available():  # each rank on its own GPU
        assert pick_device("auto", 0) == torch.device("cuda:0") and pick_device("cuda", 0) == torch.device("cuda:0")
        assert pick_device("cuda:0", 3) == torch.device("cuda:0")
    else:
        assert pick_device("auto", 0) == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda", 0)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="cannot feed"):
        EpochBatchSampler(1, 4, 0, 2)
    with pytest.raises(ValueError, match="rank"):
        EpochBatchSampler(10, 4, 2, 2)
    with pytest.raises(ValueError, match="empty batch"):  # 7 samples, 4 ranks: one rank has 1, the others 2
        EpochBatchSampler(7, 1, 3, 4)
    assert EpochBatchSampler(8, 1, 3, 4).batches() and EpochBatchSampler(7, 2, 3, 4).batches()


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """~40 synthetic people at 64x48 (train and val shards)."""
    return build_tiny_shards(tmp_path_factory)


def test_two_process_cpu_ddp_trains_once_per_sample_and_rank0_writes(tiny_shards, tmp_path: Path) -> None:
    """torchrun --nproc-per-node 2 on the CPU (gloo): trains, covers each sample once per epoch, one writer."""
    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "cal_core.cli", "train",
           "--shards", tiny_shards["train"], "--method", "cal", "--epochs", "2", "--batch-size", "8",
           "--workers", "0", "--device", "cpu", "--val-every", "0", "--no-progress", "--threads", "1",
           "--lr-steps", "", "--out", str(out)]
    env = {**os.environ, "CAL_POSE_TRACKING": "off", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "mlflow-offline.jsonl", "model.pt"]
    events = [json.loads(line) for line in (out / "mlflow-offline.jsonl").read_text().splitlines()]
    epochs = [e["data"]["values"] for e in events if e["kind"] == "metrics" and "samples_seen" in e["data"]["values"]]
    assert [m["samples_seen"] for m in epochs] == [40.0, 40.0]
    params = next(e["data"] for e in events if e["kind"] == "params")
    assert params["world_size"] == "2"
    final = checkpoint.load(str(out / "model.pt"))
    assert final["step"] == 2 * 3  # 20 samples per rank, batch 8 -> 3 batches per epoch
    assert all(torch.isfinite(t).all() for t in final["model"].values() if t.is_floating_point())


def test_a_head_with_outputs_the_loss_never_reads_trains_under_ddp(tiny_shards, tmp_path: Path) -> None:
    """heatmap with --head dual: the offset branch gets no gradient, which DDP once refused at the second step."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "cal_core.cli", "train",
           "--shards", tiny_shards["train"], "--method", "heatmap", "--head", "dual", "--epochs", "1",
           "--batch-size", "8", "--workers", "0", "--device", "cpu", "--val-every", "0", "--no-progress",
           "--threads", "1", "--lr-steps", "", "--out", str(tmp_path / "run")]
    env = {**os.environ, "CAL_POSE_TRACKING": "off", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoint.load(str(tmp_path / "run" / "model.pt"))["step"] == 3


def _gather_worker(rank: int, world: int, port: int, results) -> None:
    """One gloo rank: rank r contributes r rows of value r (rank 0 none), returns the gathered rows."""
    import torch.distributed as dist

    from cal_core.distributed import DistContext, all_gather_rows

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = torch.full((rank, 2), float(rank))
        results[rank] = all_gather_rows(rows, DistContext(rank, world, rank, torch.device("cpu"))).tolist()
        empty = all_gather_rows(torch.zeros(0, 2), DistContext(rank, world, rank, torch.device("cpu")))
        results[f"empty{rank}"] = list(empty.shape)
    finally:
        dist.destroy_process_group()


def test_all_gather_rows_concatenates_uneven_ranks_in_order() -> None:
    """Stage-2 per-batch refits under DDP fit one mixture on every rank's displacements."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gather_worker, args=(3, port, results), nprocs=3, join=True)
        expected = [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]
        assert [results[r] for r in range(3)] == [expected] * 3
        assert [results[f"empty{r}"] for r in range(3)] == [[0, 2]] * 3
