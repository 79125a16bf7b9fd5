"""The paper's central claim in miniature (Table 8): heatmap vs DARK vs UDP vs CAL at low resolution.

On the synthetic people set (fixed data seed), the same tiny backbone and the
same epoch budget for every method:

- ``heatmap``: Gaussian heatmaps + MSE (Eq. 3), argmax + quarter shift;
- ``dark``: the very same trained model, decoded with DARK (decode-only method);
- ``udp``: binary disk + offsets (Eq. 8);
- ``cal``: stage 1 (Eq. 14) for ``epochs - stage2_epochs`` epochs, then
  ``cal-pose fit-gmm`` (BIC picks K; ``--gmm-components paper`` or a number
  instead), then stage 2 with MGMs (Eq. 15) for
  ``stage2_epochs``: the same total number of epochs as the others.

Each is trained at 64x48 and 128x96 with several training seeds and scored
with pycocotools' COCOeval on the synthetic val set (GT boxes, flip test)
through :mod:`cal_core.evaluate`. Shards are cached between runs in
``--cache`` (keyed by sizes and data seed).

    .venv/bin/python -m benchmarks.accuracy            # the full run (sized for ~25-30 min on 2 quiet cores)
    .venv/bin/python -m benchmarks.accuracy --quick    # a smoke run (~2-3 min)

Budget arithmetic for the full run: one thread trains while one loader worker
decodes and augments; the training loop measured ~320 samples/s at 64x48 on
the (loaded) 2-core machine, so assume ~450/s at 64x48 and ~130/s at 128x96
when quiet. 3000 people x 16 epochs at 64x48 (~110 s per run) and x 5 epochs
at 128x96 (~115 s per run), 3 trained methods x 2 seeds, plus data, fit-gmm
and evaluation: ~25 min.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import print_table, write_results

NAME = "accuracy"
SIZES = ("64x48", "128x96")


@dataclass(frozen=True)
class Budget:
    """How much data and training every method gets at one input size."""

    size: str
    epochs: int
    stage2_epochs: int
    batch_size: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line settings; ``--quick`` shrinks data and epochs to a smoke run."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny data and 2 epochs: proves the script works")
    parser.add_argument("--train-people", type=int, default=3000, help="synthetic training people")
    parser.add_argument("--val-people", type=int, default=500, help="synthetic validation people")
    parser.add_argument("--data-seed", type=int, default=2024)
    parser.add_argument("--style", default="full", help="synthetic scene style: full (default) or plain")
    parser.add_argument("--seeds", default="0,1", help="training seeds")
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--epochs", default="64x48:16,128x96:5", help="epochs per input size (same for every method)")
    parser.add_argument("--stage2-epochs", default="64x48:3,128x96:1", help="CAL stage-2 share of those epochs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one core trains, one loads)")
    parser.add_argument("--methods", default="heatmap,udp,cal", help="trained methods (dark reuses heatmap)")
    parser.add_argument("--gmm-components", default="auto", help="CAL's fit-gmm --components: auto (BIC), paper or N")
    parser.add_argument("--cache", default="runs/bench-accuracy", help="folder for shards and run outputs")
    parser.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_people, args.val_people, args.seeds = 60, 30, "0"
        args.epochs, args.stage2_epochs = "64x48:2,128x96:2", "64x48:1,128x96:1"
    return args


def _per_size(text: str) -> dict[str, int]:
    """``"64x48:24,128x96:12"`` -> ``{"64x48": 24, "128x96": 12}``."""
    pairs = [item.split(":") for item in text.split(",") if item.strip()]
    return {size.strip(): int(value) for size, value in pairs}


def budgets(args: argparse.Namespace) -> list[Budget]:
    """One :class:`Budget` per requested input size."""
    epochs, stage2 = _per_size(args.epochs), _per_size(args.stage2_epochs)
    out = []
    for size in (s.strip() for s in args.sizes.split(",") if s.strip()):
        if size not in epochs or size not in stage2:
            raise SystemExit(f"--epochs and --stage2-epochs need an entry for {size}")
        if not 0 < stage2[size] < epochs[size]:
            raise SystemExit(f"CAL stage-2 epochs must be in 1..{epochs[size] - 1} at {size}")
        out.append(Budget(size, epochs[size], stage2[size], args.batch_size))
    return out


def prepare_data(args: argparse.Namespace, sizes: list[str]) -> dict[str, tuple[str, str]]:
    """Synthetic COCO tree + train/val shards per size, cached under ``--cache``; ``size -> (train, val)``."""
    from cal_core.cli import main as cli

    style = "" if args.style == "full" else f"-{args.style}"
    root = Path(args.cache) / f"data-{args.train_people}-{args.val_people}-s{args.data_seed}{style}"
    coco = root / "coco"
    if not (coco / "annotations").is_dir():
        _check(cli(["synth", "--out", str(coco), "--train", str(args.train_people), "--val", str(args.val_people),
                    "--seed", str(args.data_seed), "--style", args.style]), "synth")
    out: dict[str, tuple[str, str]] = {}
    for split in ("train", "val"):
        todo = [s for s in sizes if not (root / split / s / "manifest.json").is_file()]
        if todo:
            flags = [f for s in todo for f in ("--input-size", s)]
            _check(cli(["downsample", "--coco", str(coco), "--split", split, "--out", str(root / split), *flags,
                        "--workers", str(max(1, args.threads))]), f"downsample {split}")
    for size in sizes:
        out[size] = (str(root / "train" / size), str(root / "val" / size))
    return out


def _check(code: int, what: str) -> None:
    if code:
        raise SystemExit(f"{what} failed with exit code {code}")


def _lr_steps(epochs: int) -> tuple[int, ...]:
    """The paper's schedule (x0.1 at 170/210 and 200/210 of the run), scaled to ``epochs``."""
    steps = sorted({max(1, round(epochs * 170 / 210)), max(1, round(epochs * 200 / 210))})
    return tuple(s for s in steps if s < epochs)


def train_case(method: str, budget: Budget, seed: int, train_uri: str, run_dir: Path,
               args: argparse.Namespace) -> tuple[str, float, dict[str, Any]]:
    """Train one method under ``budget``; returns (model.pt URI, wall seconds, notes)."""
    from cal_core.config import TrainConfig
    from cal_core.fit_gmm import fit_gmm
    from cal_core.train import train

    common = {"shards": train_uri, "method": method, "batch_size": budget.batch_size, "workers": args.workers,
              "seed": seed, "val_every": 0, "threads": args.threads, "progress": False,
              "experiment": "bench-accuracy"}
    started = time.perf_counter()
    if method != "cal":
        model = train(TrainConfig(out=str(run_dir), epochs=budget.epochs, lr_steps=_lr_steps(budget.epochs),
                                  **common))
        return model, time.perf_counter() - started, {}
    stage1 = budget.epochs - budget.stage2_epochs
    s1 = train(TrainConfig(out=str(run_dir / "stage1"), epochs=stage1, lr_steps=_lr_steps(stage1), **common))
    report = fit_gmm(s1, train_uri, str(run_dir / "gmm"), components=args.gmm_components, max_samples=2000,
                     seed=seed, experiment="bench-accuracy")
    s2 = train(TrainConfig(out=str(run_dir / "stage2"), stage=2, init=s1, gmm=str(run_dir / "gmm" / "gmm.json"),
                           epochs=budget.stage2_epochs, **common))
    notes = {"stage1_epochs": stage1, "stage2_epochs": budget.stage2_epochs,
             "gmm_components": report["n_components"]}
    return s2, time.perf_counter() - started, notes


def score(model_uri: str, val_uri: str, decode_as: str) -> dict[str, float]:
    """COCO AP/AR (GT boxes, flip test) of a checkpoint, decoded as ``decode_as`` (cal_core.evaluate).

    ``dark`` scores the heatmap model with DARK decoding: the codec keeps the
    trained model's sigma, only the decoder changes.
    """
    from cal_core.checkpoint import codec_from_config
    from cal_core.codecs import build_codec
    from cal_core.evaluate import evaluate_model
    from cal_core.models import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(model_uri)
    codec = codec_from_config(ckpt["config"])
    if decode_as != ckpt["config"]["method"]:
        codec = build_codec(decode_as, codec.input_size, sigma=codec.sigma)
    return evaluate_model(model_from_checkpoint(ckpt), codec, val_uri, flip=True)


def _decoded_as(method: str) -> list[str]:
    """The rows a trained model yields: the heatmap model is also scored with DARK decoding."""
    return ["heatmap", "dark"] if method == "heatmap" else [method]


def _import_before_timing() -> None:
    """Import the training stack once, so the first method's ``train_seconds`` carry no import cost."""
    import importlib

    for name in ("cal_core.train", "cal_core.fit_gmm", "cal_core.data.dataset", "cal_core.evaluate",
                 "cal_core.models", "cal_core.losses", "cal_core.mgm"):
        importlib.import_module(name)


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train and score every (size, seed, method); one row per decoded method."""
    _import_before_timing()
    plan = budgets(args)
    data = prepare_data(args, [b.size for b in plan])
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []
    for budget in plan:
        train_uri, val_uri = data[budget.size]
        for seed in seeds:
            for method in methods:
                run_dir = Path(args.cache) / "runs" / f"{budget.size}-{method}-s{seed}"
                shutil.rmtree(run_dir, ignore_errors=True)
                model, seconds, notes = train_case(method, budget, seed, train_uri, run_dir, args)
                for decoded in _decoded_as(method):
                    metrics = score(model, val_uri, decoded)
                    rows.append({"method": decoded, "input_size": budget.size, "seed": seed,
                                 **{k: round(100 * metrics[k], 2) for k in ("AP", "AP50", "AP75", "AR")},
                                 "train_seconds": round(seconds, 1), "epochs": budget.epochs, **notes})
                    logging.info("%s", json.dumps(rows[-1]))
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread (min..max) of AP over seeds, per method and size (the Table-8-like view)."""
    out = []
    for size in dict.fromkeys(r["input_size"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            aps = [r["AP"] for r in rows if r["input_size"] == size and r["method"] == method]
            if not aps:
                continue
            picked = [r for r in rows if r["input_size"] == size and r["method"] == method]
            out.append({"input_size": size, "method": method, "seeds": len(aps), "AP": statistics.mean(aps),
                        "AP_min": min(aps), "AP_max": max(aps),
                        "AP50": statistics.mean(r["AP50"] for r in picked),
                        "AP75": statistics.mean(r["AP75"] for r in picked),
                        "AR": statistics.mean(r["AR"] for r in picked),
                        "train_s": statistics.mean(r["train_seconds"] for r in picked)})
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table(s), write ``benchmarks/results/<name>.json``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("CAL_POSE_TRACKING", "off")  # timings without MLflow round trips
    import torch

    torch.set_num_threads(args.threads)
    rows = run_all(args)
    print_table(rows, ["method", "input_size", "seed", "AP", "AP50", "AP75", "AR", "train_seconds"])
    print()
    print_table(summary(rows))
    settings = {k: v for k, v in vars(args).items() if k not in {"out_dir"}}
    name = NAME if args.style == "full" else f"{NAME}-{args.style}"  # one results file per scene style
    path = write_results(name, rows, args.out_dir, extra={"quick": args.quick, "settings": settings,
                                                           "summary": summary(rows)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
