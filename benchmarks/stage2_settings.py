"""What CAL stage 2 should train, at which learning rate, and with which MGM update: a measurement.

The paper fixes only that stage 2 runs 40 epochs after stage 1 with the
offset loss weighted by MGMs (Eq. 15). The authors' code can freeze the
heatmap path and fine-tune the offset branch only. This script trains one
CAL stage-1 model on the synthetic people set, fits the GMM on it
(``cal-pose fit-gmm``), then continues it with each stage-2 variant for the
same number of epochs, and scores every result with COCOeval (GT boxes, flip
test, through :mod:`cal_core.evaluate`). The row ``stage 1 only`` is the
starting point; a second row ``stage 1 continued`` trains stage 1 (Eq. 14)
for the same extra epochs, so a gain can be told apart from "more epochs".

    .venv/bin/python -m benchmarks.stage2_settings           # ~10 min on 2 quiet cores
    .venv/bin/python -m benchmarks.stage2_settings --quick   # smoke run
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.accuracy import prepare_data, score
from benchmarks.common import print_table, write_results

NAME = "stage2_settings"
#: (stage2_train, lr, mgm_update) variants compared.
VARIANTS: tuple[tuple[str, float, str], ...] = (
    ("all", 1e-4, "static"),
    ("all", 1e-3, "static"),
    ("offset", 1e-4, "static"),
    ("offset", 1e-3, "static"),
    ("all", 1e-4, "batch"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line settings; ``--quick`` shrinks data and epochs to a smoke run."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stage2_settings", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", default="64x48")
    parser.add_argument("--train-people", type=int, default=2000)
    parser.add_argument("--val-people", type=int, default=400)
    parser.add_argument("--data-seed", type=int, default=2024)
    parser.add_argument("--stage1-epochs", type=int, default=20)
    parser.add_argument("--stage2-epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="runs/bench-accuracy")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_people, args.val_people, args.stage1_epochs, args.stage2_epochs = 60, 30, 2, 1
    return args


def _train(args: argparse.Namespace, out: Path, **settings: Any) -> tuple[str, float]:
    """One training run (fresh folder); returns model.pt and wall seconds."""
    from cal_core.config import TrainConfig
    from cal_core.train import train

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    config = TrainConfig(out=str(out), method="cal", batch_size=args.batch_size, workers=args.workers,
                         seed=args.seed, val_every=0, threads=args.threads, progress=False, **settings)
    return train(config), time.perf_counter() - started


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Stage 1 once, the GMM, then every stage-2 variant and the stage-1 continuation; one row each."""
    from cal_core.fit_gmm import fit_gmm

    train_uri, val_uri = prepare_data(args, [args.size])[args.size]
    root = Path(args.cache) / "stage2-settings" / args.size
    e1, e2 = args.stage1_epochs, args.stage2_epochs
    s1, seconds = _train(args, root / "stage1", shards=train_uri, epochs=e1,
                         lr_steps=tuple(s for s in (round(e1 * 170 / 210), round(e1 * 200 / 210)) if 0 < s < e1))
    report = fit_gmm(s1, train_uri, str(root / "gmm"), max_samples=2000, seed=args.seed)
    gmm = str(root / "gmm" / "gmm.json")
    rows = [{"variant": "stage 1 only", "epochs": e1, **_ap(s1, val_uri), "train_seconds": round(seconds, 1)}]
    cont, seconds = _train(args, root / "stage1-continued", shards=train_uri, epochs=e2, init=s1, lr=1e-4,
                           lr_steps=())
    rows.append({"variant": "stage 1 continued (Eq. 14, lr 1e-4)", "epochs": e1 + e2, **_ap(cont, val_uri),
                 "train_seconds": round(seconds, 1)})
    for mode, lr, update in VARIANTS:
        model, seconds = _train(args, root / f"s2-{mode}-{lr:g}-{update}", shards=train_uri, stage=2, init=s1,
                                gmm=gmm, epochs=e2, lr=lr, stage2_train=mode, mgm_update=update)
        rows.append({"variant": f"stage 2: {mode}, lr {lr:g}, {update} MGM", "epochs": e1 + e2,
                     **_ap(model, val_uri), "train_seconds": round(seconds, 1)})
        logging.info("%s", rows[-1])
    for row in rows:
        row["gmm_components"] = report["n_components"]
    return rows


def _ap(model: str, val_uri: str) -> dict[str, float]:
    metrics = score(model, val_uri, "cal")
    return {k: round(100 * metrics[k], 2) for k in ("AP", "AP50", "AP75", "AR")}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table(s), write ``benchmarks/results/<name>.json``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("CAL_POSE_TRACKING", "off")
    import torch

    torch.set_num_threads(args.threads)
    rows = run_all(args)
    print_table(rows, ["variant", "epochs", "AP", "AP50", "AP75", "AR", "train_seconds"])
    settings = {k: v for k, v in vars(args).items() if k != "out_dir"}
    print(f"wrote {write_results(NAME, rows, args.out_dir, extra={'quick': args.quick, 'settings': settings})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
