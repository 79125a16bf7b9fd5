"""Process group and data sharding for training on a CPU, one GPU, or several GPUs via torchrun.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them the
run is a single process and nothing here touches ``torch.distributed``. The
backend is NCCL on CUDA and gloo on the CPU, so the same command trains on a
laptop and in a multi-GPU pod (no code path assumes CUDA).

:class:`EpochBatchSampler` gives each rank a disjoint slice of one seeded
permutation per epoch, so every sample is seen exactly once per epoch across
ranks, and lets a resumed run skip the batches it already trained on.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

#: Minutes a collective waits for the other ranks (env): rank 0 validates and writes checkpoints alone
#: while the others wait in the next epoch's first all-reduce, so it must outlast a validation pass.
TIMEOUT_ENV = "CAL_POSE_DDP_TIMEOUT_MIN"


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size and the torch device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        """True when several processes train together (torchrun)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints and talks to MLflow."""
        return self.rank == 0


def pick_device(preference: str, local_rank: int) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU; ``cuda`` without CUDA is an error."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {preference} requested but CUDA is not available (--device auto or cpu)")
        return torch.device(preference if ":" in preference else f"cuda:{local_rank}")
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def init(preference: str = "auto") -> DistContext:
    """Join the torchrun process group when launched by torchrun; else a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=float(os.environ.get(TIMEOUT_ENV, "60"))))
    return DistContext(rank, world, local_rank, device)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (a no-op for single-process runs)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``values`` over ranks (a copy on single-process runs)."""
    out = values.detach().clone()
    if ctx.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_rows(rows: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Every rank's ``rows`` ``(M_r, ...)`` concatenated in rank order (``rows`` itself single-process).

    Ranks may hold different ``M_r`` (e.g. their batch slices' labelled
    joints): the counts are gathered first and the rows padded to the
    largest, as ``all_gather`` needs equal shapes.
    """
    if not ctx.distributed:
        return rows
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(ctx.world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    if max(sizes) == 0:
        return rows
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op when single-process)."""
    if ctx.distributed:
        dist.barrier()


class EpochBatchSampler(Sampler[list[int]]):
    """This rank's batches of a seeded per-epoch permutation; every rank gets the same number of batches.

    Rank ``r`` of ``W`` takes positions ``r, r + W, ...`` of the permutation of
    ``range(num_samples)`` drawn from ``seed`` and the epoch, so the ranks'
    slices are disjoint and cover every index exactly once per epoch (no
    padding, no duplicates). Each slice is cut into the same number of batches
    (``ceil(largest slice / batch_size)``, sizes as equal as possible), so
    DDP's gradient all-reduce never waits on a rank that ran out of data.
    ``set_epoch(epoch, skip)`` drops the first ``skip`` batches (already
    trained before a resume).

    ``blocks`` (the first index of each shard, then ``num_samples``) and
    ``window`` shuffle a set larger than the loader's shard cache: shards in
    a random order, ``window`` at a time, the samples of each window
    permuted together. Every index still comes once per epoch, and all
    ranks work through the same window at once, so each process reads each
    shard about once per epoch instead of once per sample. Without them, or
    when the window holds every shard, the permutation is uniform.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, blocks: Sequence[int] | None = None,
                 window: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} training samples cannot feed {world_size} ranks")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch, self.skip = 0, 0
        self.blocks = list(blocks) if blocks is not None and 0 < window < len(blocks) - 1 else None
        if self.blocks is not None and (self.blocks[0] != 0 or self.blocks[-1] != num_samples):
            raise ValueError(f"blocks must run from 0 to {num_samples}, got {self.blocks[0]}..{self.blocks[-1]}")
        self.window = window
        if num_samples // world_size < self.batches_per_epoch:  # only batch size 1 with N % W != 0
            raise ValueError(f"batch size {batch_size} over {world_size} ranks and {num_samples} samples "
                             "leaves the ranks with fewer samples an empty batch: use a batch size >= 2")

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's permutation and how many of this rank's batches to skip."""
        self.epoch, self.skip = epoch, skip

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank runs per epoch: ``ceil(ceil(N / W) / B)``."""
        largest = -(-self.num_samples // self.world_size)
        return -(-largest // self.batch_size)

    def batches(self) -> list[list[int]]:
        """All batches of this rank for the current epoch (before skipping)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = self._windowed(generator) if self.blocks else torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        mine = order[self.rank :: self.world_size]
        return [chunk.tolist() for chunk in torch.tensor_split(mine, self.batches_per_epoch)]

    def _windowed(self, generator: torch.Generator) -> torch.Tensor:
        """Shards in random order, ``window`` at a time, each window's samples permuted together."""
        starts = self.blocks
        shards = torch.randperm(len(starts) - 1, generator=generator).tolist()
        parts = []
        for first in range(0, len(shards), self.window):
            ids = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in shards[first:first + self.window]])
            parts.append(ids[torch.randperm(len(ids), generator=generator)])
        return torch.cat(parts)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches()[self.skip :])

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.skip)
