"""onnxruntime vs torch eager on this CPU: latency at batch 1, throughput at batch 32.

For each backbone (tiny, hrnet_w18_small, hrnet_w32) and input size (64x48,
128x96) the network (heatmap head, random weights: speed does not depend on
them) runs in torch eager (``no_grad``, float32) and through its exported
``raw`` ONNX graph in onnxruntime's CPU provider, both with the same thread
count. The two are timed in turns (torch, onnxruntime, torch, ...) after
warm-up, so a change of machine load hits both; each timing is the median of
its runs.

    .venv/bin/python -m benchmarks.onnx [--quick]

Target (issue 5): onnxruntime >= 1.5x torch eager throughput at batch 32 for
HRNet-W32 at 128x96.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.common import print_table, write_results
from cal_core.export import RawGraph, export_onnx, ort_session
from cal_core.models import build_model

BACKBONES = ("tiny", "hrnet_w18_small", "hrnet_w32")
SIZES = ((64, 48), (128, 96))
LATENCY_BATCH = 1
THROUGHPUT_BATCH = 32


def paired_median_seconds(first: Callable[[], Any], second: Callable[[], Any], warmup: int,
                          repeats: int) -> tuple[float, float]:
    """Median wall times of ``first()`` and ``second()``, called in turns ``repeats`` times after warm-up."""
    for _ in range(warmup):
        first()
        second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in zip((first, second), times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def bench_one(backbone: str, size: tuple[int, int], repeats: int, threads: int, tmp: Path) -> list[dict[str, Any]]:
    """Rows for one backbone and size: batch 1 and batch 32, torch eager vs onnxruntime."""
    torch.manual_seed(0)
    model = build_model(backbone, "heatmap", input_size=size).eval()
    graph = RawGraph(model, has_offsets=False)
    path = tmp / f"{backbone}-{size[0]}x{size[1]}.onnx"
    export_onnx(graph, torch.randn(2, 3, *size), path, ["heatmap"], {"benchmark": "onnx"})
    session = ort_session(path, threads=threads)
    rows = []
    for batch in (LATENCY_BATCH, THROUGHPUT_BATCH):
        x = torch.randn(batch, 3, *size)
        feed = {"x": x.numpy()}
        with torch.inference_mode():
            want = graph(x)[0].numpy()
            got = session.run(None, feed)[0]
            torch_s, ort_s = paired_median_seconds(lambda x=x: graph(x), lambda feed=feed: session.run(None, feed),
                                                   warmup=2, repeats=repeats)
        rows.append({
            "model": backbone, "input_size": f"{size[0]}x{size[1]}", "batch": batch,
            "torch_ms": 1000 * torch_s, "ort_ms": 1000 * ort_s,
            "torch_per_s": batch / torch_s, "ort_per_s": batch / ort_s, "ratio": torch_s / ort_s,
            "ort_latency_ms": 1000 * ort_s,
            # random weights give large outputs (HRNet-W32: ~1e5), so float32 noise is judged relatively
            "max_rel_diff": float(np.abs(want - got).max() / max(np.abs(want).max(), 1e-12)),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the grid (``--quick``: tiny net, few repeats), print the table, write the results JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run: tiny net only")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for both")
    args = parser.parse_args(argv)
    backbones = ("tiny",) if args.quick else BACKBONES
    repeats = args.repeats or (3 if args.quick else 15)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        grid = [(b, s) for b in backbones for s in SIZES]
        for backbone, size in tqdm(grid, desc="onnx benchmark", unit="model"):
            rows += bench_one(backbone, size, repeats, args.threads, Path(tmp))
    print_table([{**r, "max_rel_diff": f"{r['max_rel_diff']:.1e}"} for r in rows], ["model", "input_size", "batch", "torch_ms", "ort_ms", "torch_per_s", "ort_per_s",
                       "ratio", "max_rel_diff"])
    target = [r for r in rows if r["model"] == "hrnet_w32" and r["input_size"] == "128x96"
              and r["batch"] == THROUGHPUT_BATCH]
    if target:
        print(f"HRNet-W32 128x96 batch {THROUGHPUT_BATCH}: onnxruntime {target[0]['ratio']:.2f}x torch "
              f"(target >= 1.5x)")
    path = write_results("onnx", rows, extra={"quick": args.quick, "threads": args.threads, "repeats": repeats})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
