"""Parameters and GFLOPs of every backbone/head, next to the paper's Tables 1 and 9.

``gmacs`` are multiply-accumulates in units of 1e9, i.e. half of
``torch.utils.flop_counter.FlopCounterMode``'s FLOPs (convolutions and matmuls;
BatchNorm, ReLU, resizing are not counted). ``gflops_paper`` is the same count
in the unit the paper's Tables 1 and 9 use: the authors' ``get_model_summary``
(HRNet code base, ``lib/utils/utils.py``) sums conv/linear multiply-adds and
divides by 1024**3, so their "1.8 GFLOPs" for HRNet-W32 at 128x96 is 1.91e9
multiply-adds. The forward runs on the ``meta`` device, so no arithmetic is
done and even HRNet-W48 at 384x288 takes a moment.

    .venv/bin/python -m benchmarks.model_stats [--quick]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import print_table, write_results
from cal_core.models import BACKBONES, HEADS, build_model, count_parameters

#: (backbone, head, "HxW") -> (method in the paper, #Params M, GFLOPs) from Table 1 (128x96) / Table 9 (384x288).
PAPER: dict[tuple[str, str, str], tuple[str, float, float]] = {
    ("hrnet_w32", "heatmap", "128x96"): ("HRNet", 28.5, 1.8),
    ("hrnet_w48", "heatmap", "128x96"): ("HRNet", 63.6, 3.7),
    ("hrnet_w32", "offset", "128x96"): ("UDP", 28.6, 1.8),
    ("hrnet_w48", "offset", "128x96"): ("UDP", 63.7, 3.7),
    ("hrnet_w32", "dual", "128x96"): ("CAL", 49.3, 2.5),
    ("hrnet_w48", "dual", "128x96"): ("CAL", 110.3, 5.3),
    ("hrnet_w48", "heatmap", "384x288"): ("HRNet", 63.8, 32.9),
    ("hrnet_w48", "offset", "384x288"): ("UDP", 63.6, 33.0),
    ("hrnet_w48", "dual", "384x288"): ("CAL", 110.2, 47.2),
}


def gmacs(model: torch.nn.Module, size: tuple[int, int]) -> float:
    """Multiply-accumulates (in G) of one forward pass of a ``meta``-device model on one image of ``size``."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.empty(1, 3, *size, device="meta"))
    return counter.get_total_flops() / 2e9


def measure(backbone: str, head: str, sizes: list[str]) -> list[dict]:
    """One row per input size for a backbone/head pair, with the paper's numbers where it has them."""
    with torch.device("meta"):
        model = build_model(backbone, head)
    params = count_parameters(model) / 1e6
    rows = []
    for size in sizes:
        h, w = (int(v) for v in size.split("x"))
        macs = gmacs(model, (h, w))
        row = {"backbone": backbone, "head": head, "input_size": size, "params_M": round(params, 3),
               "gmacs": round(macs, 3), "gflops_paper": round(macs * 1e9 / 2**30, 3)}
        if (backbone, head, size) in PAPER:
            method, paper_params, paper_gflops = PAPER[(backbone, head, size)]
            row.update(paper_method=method, paper_params_M=paper_params, paper_gflops=paper_gflops,
                       params_diff_pct=round(100 * (params / paper_params - 1), 2))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny and HRNet-W32 at 128x96 only")
    args = parser.parse_args(argv)
    backbones = ("tiny", "hrnet_w32") if args.quick else BACKBONES
    rows = []
    for backbone in backbones:
        for head in HEADS:
            sizes = ["128x96"] if args.quick else ["64x48", "128x96", "256x192"]
            if backbone == "hrnet_w48" and not args.quick:
                sizes.append("384x288")
            rows += measure(backbone, head, sizes)
    print_table(rows, ["backbone", "head", "input_size", "params_M", "gmacs", "gflops_paper", "paper_method",
                       "paper_params_M", "paper_gflops", "params_diff_pct"])
    path = write_results("model_stats", rows, extra={"quick": args.quick, "units": {
        "gmacs": "multiply-accumulates / 1e9",
        "gflops_paper": "multiply-accumulates / 2**30 (the authors' get_model_summary)"}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
