"""Training samples/s per CPU core from shards, augmentation on (DESIGN.md section 6, issue 3).

Builds a synthetic people set (``cal_core.data.synthetic.generate``), turns it
into shards at 64x48 and 128x96 with the real downsampling stage
(``cal_core.data.downsample.downsample``), then reads training batches as a
DataLoader worker builds them: ``ShardDataset(train=True)[i]`` for each index
of a batch of ``--batch``, in a random order (as an epoch permutation would),
then the default collate (stacking).

``samples_per_s_per_core`` is samples per CPU-second of this process
(``time.process_time``), so other load on a shared machine does not deflate
it; ``wall_samples_per_s`` is the plain wall-clock rate for comparison. The
rates and stage times are the best of 3 rounds (1 with ``--quick``). The
``*_us`` columns split one sample's CPU time into its stages (JPEG decode,
drawing + applying the augmentation affine, normalisation), timed separately
over the same samples, to show what bounds the rate; ``other_us`` is the rest
(bookkeeping, tensors, stacking).

The codec's targets are not the loader's work: the trainer builds them for a
whole batch on its device (``cal_core.data.dataset.add_targets``). What that
costs when the device is this CPU is ``targets_us`` (one batched
``add_targets`` for the ``cal``, ``heatmap`` and ``udp`` codecs, per sample),
and ``cpu_targets_samples_per_s`` the rate of loader + targets on one core.
Target: at least 1,500 samples/s per core at 128x96 with ``cal`` targets.

    .venv/bin/python -m benchmarks.loader [--quick]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import default_collate

from benchmarks.common import print_table, write_results
from cal_core.codecs import build_codec
from cal_core.data import synthetic
from cal_core.data.augment import sample_transform, warp_sample
from cal_core.data.dataset import ShardDataset, add_targets, normalise
from cal_core.data.downsample import downsample

SIZES = ("64x48", "128x96")
CODECS = ("cal", "heatmap", "udp")


def build_shards(root: Path, people: int) -> Path:
    """Synthetic COCO tree -> shards at every size in :data:`SIZES` (the real stage); returns the shards folder."""
    synthetic.generate(root / "coco", people, 0, seed=0)
    downsample(str(root / "coco"), "train", str(root / "shards"), SIZES, progress=False)
    return root / "shards"


def _batches(order: list[int], batch: int) -> list[list[int]]:
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def _cpu_rate(dataset: ShardDataset, order: list[int], rounds: int, batch: int) -> tuple[float, float]:
    """Best (samples per CPU-second, samples per wall-second) of collated batches over ``order``, of ``rounds``."""
    best_cpu, best_wall = 0.0, 0.0
    for _ in range(rounds):
        cpu, wall = time.process_time(), time.perf_counter()
        for indices in _batches(order, batch):
            default_collate([dataset[index] for index in indices])
        best_cpu = max(best_cpu, len(order) / (time.process_time() - cpu))
        best_wall = max(best_wall, len(order) / (time.perf_counter() - wall))
    return best_cpu, best_wall


def _stage_us(dataset: ShardDataset, order: list[int], rounds: int, batch: int) -> dict[str, float]:
    """CPU microseconds per sample of each loader stage over all of ``order`` (best of ``rounds``)."""
    rows = []
    for index in order:
        shard_i = int(np.searchsorted(dataset._starts, index, side="right") - 1)
        shard = dataset._shard(shard_i)
        rows.append((shard, index - dataset._starts[shard_i], index))
    crops = [cv2.imdecode(shard.jpeg(row), cv2.IMREAD_COLOR) for shard, row, _ in rows]
    warped = []

    def decode() -> None:
        for shard, row, _ in rows:
            cv2.imdecode(shard.jpeg(row), cv2.IMREAD_COLOR)

    def augment() -> None:
        warped.clear()
        for (shard, row, index), crop in zip(rows, crops, strict=True):
            kp = shard.keypoints[row]
            rng = random.Random(index)
            matrix, flip = sample_transform(
                rng,
                kp[:, :2],
                kp[:, 2],
                (crop.shape[1], crop.shape[0]),
                dataset.margin,
                dataset.input_size,
                dataset.augment,
            )
            warped.append(warp_sample(crop, kp[:, :2], kp[:, 2], matrix, flip, dataset.input_size))

    def norm() -> None:
        for image, _, _ in warped:
            normalise(image)

    out = {}
    for name, stage in (
        ("decode_us", decode),
        ("augment_us", augment),
        ("normalise_us", norm),
    ):
        times = []
        for _ in range(rounds):
            start = time.process_time()
            stage()
            times.append(time.process_time() - start)
        out[name] = min(times) / len(order) * 1e6
    return out


def _targets_us(dataset: ShardDataset, order: list[int], rounds: int, batch: int) -> float:
    """CPU microseconds per sample of ``add_targets`` on collated batches (best of ``rounds``)."""
    batches = [default_collate([dataset[index] for index in indices]) for indices in _batches(order, batch)]
    times = []
    for _ in range(rounds):
        start = time.process_time()
        for collated in batches:
            add_targets(collated, dataset.codec)
        times.append(time.process_time() - start)
    return min(times) / len(order) * 1e6


def measure(
    shards: Path, size: str, codec_name: str, samples: int, rounds: int, batch: int, seed: int = 0
) -> dict[str, Any]:
    """One row: rates and stage split for ``codec_name`` targets at ``size``."""
    dataset = ShardDataset(str(shards / size), build_codec(codec_name, size), train=True, seed=seed)
    rng = random.Random(seed)
    order = [rng.randrange(len(dataset)) for _ in range(samples)]
    _cpu_rate(dataset, order[: max(20, samples // 20)], 1, batch)  # warm-up: caches, lazy imports
    per_core, wall = _cpu_rate(dataset, order, rounds, batch)
    stages = _stage_us(dataset, order, rounds, batch)
    other = max(0.0, 1e6 / per_core - sum(stages.values()))
    targets = _targets_us(dataset, order, rounds, batch)
    return {
        "input_size": size,
        "codec": codec_name,
        "samples_per_s_per_core": round(per_core, 1),
        "wall_samples_per_s": round(wall, 1),
        **{k: round(v, 1) for k, v in stages.items()},
        "other_us": round(other, 1),
        "targets_us": round(targets, 1),
        "cpu_targets_samples_per_s": round(1e6 / (1e6 / per_core + targets), 1),
        "samples": samples,
        "batch": batch,
        "rounds": rounds,
        "instances": len(dataset),
    }


def main(argv: list[str] | None = None) -> int:
    """Build shards, measure every (size, codec), print the table, write results/loader.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a seconds-long smoke run (tiny set, few samples)"
    )
    parser.add_argument("--people", type=int, default=None, help="synthetic people to shard (default 1500)")
    parser.add_argument("--samples", type=int, default=None, help="samples timed per row (default 3000)")
    parser.add_argument("--batch", type=int, default=32, help="samples per collated batch (default 32)")
    args = parser.parse_args(argv)
    people = args.people or (60 if args.quick else 1500)
    samples = args.samples or (200 if args.quick else 3000)
    rounds = 1 if args.quick else 3
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # one core: no OpenCV worker threads either
    with tempfile.TemporaryDirectory(prefix="cal-pose-loader-") as tmp:
        shards = build_shards(Path(tmp), people)
        rows = [measure(shards, size, name, samples, rounds, args.batch) for size in SIZES for name in CODECS]
    print_table(rows)
    path = write_results(
        "loader",
        rows,
        extra={"quick": args.quick, "people": people, "target_samples_per_s_per_core_128x96": 1500},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
