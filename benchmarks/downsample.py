"""Downsampling throughput: instances/s per core of ``cal-pose downsample`` vs a naive crop loop.

Ours: the whole stage (:func:`cal_core.data.downsample.downsample`) with one
worker, which runs in this process (no pool): JSON parsing, one reduced-size
JPEG decode per image (simplejpeg, libjpeg-turbo DCT scaling), box
pre-reduction of the crop's region, bilinear warp, JPEG encode, zstd parquet
shards, annotations.json and the manifest.

Naive baseline, what most pose code does per sample (e.g. the authors'
HRNet-based ``JointsDataset.__getitem__``): read and fully decode the image
for every person (``cv2.imread`` ignoring EXIF orientation, then BGR -> RGB),
one ``cv2.warpAffine`` (INTER_LINEAR) to the same crop geometry, plus a JPEG
encode of the crop so both produce the same thing (the baseline skips the
parquet writing ours pays for).

Both run in this process on one core (OpenCV threads = 1) over coco-mini's
kept people (train and val, COCO rules), files warm in the page cache, after
one untimed warm-up run of each. "Per core" rates divide by the process's CPU
time (``time.process_time``), which other jobs on a shared machine disturb
far less than wall time (still ~10-20% run to run with both cores busy,
and this VM's core speed drifts by up to ~40% over minutes); wall-clock
rates are reported next to them. The two are timed in turns (ours, naive,
ours, ...) so a drift hits both, and the best of ``--repeats`` runs of each
is kept. ``--quick``: 10 val images, one repeat.

Why not 3x (profiled at 64x48 on 2026-11-24; 2.24x-2.45x best-of over five
runs, e.g. 819 vs 337 instances/s per core): one decode per image is the floor, and it is half of
the stage. libjpeg's DCT scaling skips only the inverse DCT and colour work;
entropy decoding still reads every coefficient, so a 1/8-scale decode costs
~55-67% of a full one (1.45 vs 2.18 ms an image on coco-mini; the N/8
factors between are no way out: 3/4 and 7/8 take 2.7 and 3.5 ms, their
inverse DCTs have no SIMD), and 29 of coco-mini's 67 images hold a person small
enough to need full resolution. Of the stage's ~250 ms of CPU, decoding is
~125 ms (~1.9 ms per image) and the C work every crop needs (box reduce,
bilinear warp, JPEG encode of the crop, then parquet + zstd) ~55 ms. 3x at
the naive rate measured beside it would be ~205 ms, leaving ~25 ms for COCO
JSON parsing and planning, row building, annotations.json and the manifest
and journal writes; they take ~70 ms even after this stop's trimming
(orjson, closed-form affines, simplejpeg's lighter decode call). Going
further needs a region decode (libjpeg-turbo's cropping region / skipped
scanlines: no inverse DCT outside the crops, no entropy decoding below the
lowest one), and it would not reach 3x either: a throwaway C program on
this machine's libjpeg-turbo 2.1.5 (``jpeg_crop_scanline`` to the crops'
columns, ``jpeg_skip_scanlines`` to their top row, abort after their bottom
row) decoded the same 67 images at the same scales in 15-18% less CPU than
full decodes (e.g. 148 -> 122 ms a pass): ~20 ms, ~2.65x. Tried in the
stage itself (2026-11-25, not kept): TurboJPEG 3's ``tj3SetCroppingRegion``
through ctypes, over the union of an image's crop regions, gave the same
pixels as a whole decode (2544 random regions at all four DCT scales on
coco-mini) and cut a pass from 244 to 227 ms CPU at 64x48 and from 304 to
275 ms at 128x96 (best of 7, interleaved): 7% and 9%. The only TurboJPEG 3
we can install is a libjpeg-turbo 3.0 beta (2.1.92, 2023) inside the
single-maintainer ``turbojpeg`` 0.0.2 wheel (PyTurboJPEG needs the system
library; Debian ships 2.1, without the cropping API), and a pre-release
decoder binary in front of every JPEG users bring is not worth 7%.

    .venv/bin/python -m benchmarks.downsample [--quick] [--coco PATH] [--sizes 64x48,128x96]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2

from benchmarks.common import print_table, write_results
from cal_core import storage
from cal_core.data import coco, crops, downsample, shards

DEFAULT_COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


def _subset(root: Path, dst: Path, split: str, n_images: int) -> Path:
    """A COCO root with the first ``n_images`` images of ``split`` that have people (images symlinked)."""
    gt = json.loads((root / "annotations" / f"person_keypoints_{split}2017.json").read_text())
    ids = sorted({a["image_id"] for a in gt["annotations"]})[:n_images]
    images = [img for img in gt["images"] if img["id"] in ids]
    (dst / "annotations").mkdir(parents=True)
    (dst / f"{split}2017").mkdir()
    for img in images:
        (dst / f"{split}2017" / img["file_name"]).symlink_to(root / f"{split}2017" / img["file_name"])
    subset = {**gt, "images": images, "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}
    (dst / "annotations" / f"person_keypoints_{split}2017.json").write_text(json.dumps(subset))
    return dst


def time_ours(root: Path, splits: list[str], size: str, work: Path) -> tuple[int, float, float]:
    """(instances, CPU seconds, wall seconds) of the stage with one worker, output to a fresh folder."""
    out = work / "ours"
    shutil.rmtree(out, ignore_errors=True)
    cpu, wall = time.process_time(), time.perf_counter()
    instances = 0
    for split in splits:
        report = downsample.downsample(str(root), split, str(out / split), [size], workers=1, progress=False)
        instances += report[size]["counts"]["instances"]
    return instances, time.process_time() - cpu, time.perf_counter() - wall


def naive_jobs(root: Path, splits: list[str]) -> list[tuple[str, tuple[float, float, float, float]]]:
    """(image path, box) of every kept person, by the same COCO rules as the stage."""
    jobs = []
    for split in splits:
        data, _ = coco.read_json(coco.annotation_uri(str(root), split))
        for task in coco.plan_split(coco.check_coco(data, split), split).tasks:
            path = storage.join(coco.image_root(str(root), split), task.file_name)
            jobs += [(path, inst.bbox) for inst in task.instances]
    return jobs


def time_naive(jobs: list[tuple[str, Any]], size: str) -> tuple[int, float, float]:
    """(instances, CPU seconds, wall seconds) of full decode + RGB + warpAffine + JPEG encode per person."""
    input_size = shards.parse_size(size)
    crop_h, crop_w = crops.crop_size(input_size, downsample.DEFAULT_MARGIN)
    cpu, wall = time.process_time(), time.perf_counter()
    for path, box in jobs:
        image = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION), cv2.COLOR_BGR2RGB)
        matrix = crops.crop_matrix(box, input_size, downsample.DEFAULT_MARGIN, 1.25)
        crop = cv2.warpAffine(image, matrix, (crop_w, crop_h), flags=cv2.INTER_LINEAR)
        ok, _ = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, downsample.JPEG_QUALITY])
        assert ok, path
    return len(jobs), time.process_time() - cpu, time.perf_counter() - wall


def measure(root: Path, splits: list[str], size: str, repeats: int, work: Path) -> dict[str, Any]:
    """One row: best-of-``repeats`` instances/s per core for ours and the naive loop, and the paired ratio.

    ``ratio`` divides the best rates; ``ratio_paired_median`` is the median
    over rounds of naive CPU / our CPU timed back to back, which a drifting
    core speed disturbs less.
    """
    jobs = naive_jobs(root, splits)
    time_naive(jobs[:5], size)  # warm-up: page cache, OpenCV
    time_ours(root, splits, size, work)  # warm-up: lazy imports, pyarrow, PIL plugins
    runs = [(time_ours(root, splits, size, work), time_naive(jobs, size)) for _ in range(repeats)]  # interleaved
    ours = min((r[0] for r in runs), key=lambda r: r[1])
    naive = min((r[1] for r in runs), key=lambda r: r[1])
    if ours[0] != naive[0]:
        raise RuntimeError(f"instance counts differ: stage {ours[0]}, naive {naive[0]}")
    ours_rate, naive_rate = ours[0] / ours[1], naive[0] / naive[1]
    return {"input_size": size, "instances": ours[0], "ours_per_core": ours_rate,
            "naive_per_core": naive_rate, "ratio": ours_rate / naive_rate,
            "ratio_paired_median": statistics.median(n[1] / o[1] for o, n in runs),
            "ours_wall_per_s": ours[0] / ours[2], "naive_wall_per_s": naive[0] / naive[2]}


def main(argv: list[str] | None = None) -> int:
    """Measure every size, print the table and write ``benchmarks/results/downsample.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run on 10 val images")
    parser.add_argument("--coco", type=Path, default=DEFAULT_COCO, help="COCO root (default: shared coco-mini)")
    parser.add_argument("--sizes", default="64x48,128x96", help="comma-separated input sizes")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="bench-downsample-") as tmp:
        work = Path(tmp)
        root, splits, repeats = args.coco, ["train", "val"], args.repeats
        if args.quick:
            root, splits, repeats = _subset(args.coco, work / "subset", "val", 10), ["val"], 1
        rows = [measure(root, splits, size, repeats, work) for size in args.sizes.split(",")]
    print_table(rows, ["input_size", "instances", "ours_per_core", "naive_per_core", "ratio", "ratio_paired_median",
                       "ours_wall_per_s", "naive_wall_per_s"])
    path = write_results("downsample", rows, extra={"quick": args.quick, "coco": str(args.coco),
                                                   "splits": splits, "repeats": repeats})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
