"""Training-step throughput and peak memory per backbone/head/input size (issue 4).

One step = forward, the method's loss (``cal_core.losses.build_loss``: ``udp``
Eq. 8 for the ``offset`` head, ``cal`` stage 1 Eq. 14 for ``dual``, Eq. 3 for
``heatmap``), backward and an Adam update, on one fixed random batch (data
loading is not part of the step). Every case runs in a fresh subprocess so its
peak memory is its own: on the CPU ``ru_maxrss`` of that process (it includes
the Python + torch runtime, reported separately as ``runtime_mem_mb``), on a
GPU ``torch.cuda.max_memory_allocated``. The GPU path uses AMP (bf16 autocast,
the loss in float32). Throughput is the median over the timed steps after
warm-up; on a shared CPU run it with nothing else busy.

    .venv/bin/python -m benchmarks.train_step [--quick] [--device auto|cpu|cuda] [--threads 2]
        [--models tiny,hrnet_w18_small,hrnet_w32]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import print_table, write_results
from cal_core.losses import build_loss
from cal_core.models import build_model

#: Head -> the method whose loss trains it.
LOSS_METHOD = {"heatmap": "heatmap", "offset": "udp", "dual": "cal"}
CASES = [(backbone, head, size) for backbone in ("tiny", "hrnet_w18_small", "hrnet_w32")
         for size in ("64x48", "128x96") for head in ("offset", "dual")]
COLUMNS = ["model", "head", "input_size", "device", "batch", "samples_per_s", "step_ms", "peak_mem_mb",
           "runtime_mem_mb", "loss"]


def _maxrss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch(model_head: str, batch: int, size: tuple[int, int], device: torch.device) -> tuple:
    """A random input batch and loss targets of the right shapes (17 joints, all labelled)."""
    h, w, k = size[0] // 4, size[1] // 4, 17
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *size, generator=gen)
    targets = {"heatmap": torch.rand(batch, k, h, w, generator=gen)}
    if model_head != "heatmap":
        targets["offset"] = torch.randn(batch, k, 2, h, w, generator=gen)
    weights = torch.ones(batch, k)
    return x.to(device), {n: t.to(device) for n, t in targets.items()}, weights.to(device)


def run_case(backbone: str, head: str, size_text: str, device_name: str, batch: int, warmup: int,
             iters: int) -> dict:
    """Time ``warmup + iters`` training steps of one case in this process and return its row."""
    device = torch.device(device_name)
    size = tuple(int(v) for v in size_text.split("x"))
    runtime_mb = _maxrss_mb()
    torch.manual_seed(0)
    model = build_model(backbone, head, input_size=size).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = build_loss(LOSS_METHOD[head])
    x, targets, weights = _batch(head, batch, size, device)
    cuda = device.type == "cuda"
    times = []
    for step in range(warmup + iters):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            outputs = model(x)
        total, _ = loss_fn({n: t.float() for n, t in outputs.items()}, targets, weights)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"model": backbone, "head": head, "input_size": size_text,
            "device": torch.cuda.get_device_name(device) + " bf16-amp" if cuda
            else f"cpu ({torch.get_num_threads()} threads)",
            "batch": batch, "samples_per_s": round(batch / step_s, 2), "step_ms": round(1000 * step_s, 2),
            "peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _maxrss_mb(), 1),
            "runtime_mem_mb": 0.0 if cuda else round(runtime_mb, 1),
            "loss": f"{LOSS_METHOD[head]} (cal_core.losses)", "timed_steps": iters}


def _child(args: argparse.Namespace) -> int:
    """Subprocess entry: run one case and print its row as the last stdout line."""
    torch.set_num_threads(args.threads)
    backbone, head, size = args.case.split(":")
    row = run_case(backbone, head, size, args.device, args.batch, args.warmup, args.iters)
    print(json.dumps(row))
    return 0


def _spawn(case: tuple[str, str, str], args: argparse.Namespace) -> dict:
    """Run one case in a fresh interpreter (its own peak memory) and parse its row."""
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--case", ":".join(case), "--device", args.device,
           "--threads", str(args.threads), "--batch", str(args.batch), "--warmup", str(args.warmup),
           "--iters", str(args.iters)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny net only, 1 warm-up + 2 timed steps")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per case")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--models", default="tiny,hrnet_w18_small,hrnet_w32",
                        help="comma-separated backbones to run (default: all three)")
    parser.add_argument("--tag", default="", help="results file name suffix: train_step-<tag>.json (e.g. h100), "
                        "so a GPU run does not overwrite the CPU results")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.case:
        return _child(args)
    models = ["tiny"] if args.quick else args.models.split(",")
    cases = [c for c in CASES if c[0] in models]
    if not cases:
        parser.error(f"--models {args.models!r} names none of {sorted({c[0] for c in CASES})}")
    if args.quick:
        args.warmup, args.iters = 1, 2
    rows = [_spawn(case, args) for case in cases]
    print_table(rows, COLUMNS)
    path = write_results(f"train_step-{args.tag}" if args.tag else "train_step", rows, extra={"quick": args.quick, "batch": args.batch,
                                                    "threads": args.threads, "warmup": args.warmup})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
