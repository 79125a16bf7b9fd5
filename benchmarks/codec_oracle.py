"""Codec oracle: the quantization-error ceiling of each codec on real COCO ground truth.

For every codec and input size, each ground-truth person of the COCO sample
(GT box, non-crowd, >= 1 labelled keypoint) is cropped with the UDP geometry
(:func:`cal_core.geometry.box_to_center_size`, :func:`~cal_core.geometry.warp_matrix`),
its keypoints are encoded and decoded with no network in between, mapped
back to image pixels, and scored with pycocotools ``COCOeval`` (OKS, paper
Eq. 16) against the same ground truth. A perfect network using that codec
could score no better. The crop box is the GT box grown to cover every
labelled keypoint (then padded 1.25x as in training), so a joint lost outside
the crop does not pass for codec error.

    python -m benchmarks.codec_oracle [--quick] [--coco DIR] [--splits val train] [--sizes 64x48 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from benchmarks.common import print_table, write_results
from cal_core.codecs import CODECS, Codec, build_codec, parse_size
from cal_core.geometry import affine_points, box_to_center_size, invert_affine, warp_matrix
from cal_core.infer import to_image_coords

SIZES = ("64x48", "128x96", "256x192")
SPLITS = ("val", "train")
DEFAULT_COCO = Path(os.environ.get("CAL_POSE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data" / "coco-mini"


def load_ground_truth(coco_root: Path, split: str) -> COCO:
    """pycocotools' index of ``annotations/person_keypoints_<split>2017.json`` (its prints silenced)."""
    path = Path(coco_root) / "annotations" / f"person_keypoints_{split}2017.json"
    if not path.is_file():
        raise FileNotFoundError(f"COCO keypoint annotations not found: {path}")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def people(gt: COCO) -> list[dict[str, Any]]:
    """Non-crowd person annotations with a positive-size box and at least one labelled keypoint."""
    anns = gt.loadAnns(gt.getAnnIds(catIds=[1], iscrowd=False))
    return [a for a in anns if a.get("num_keypoints", 0) > 0 and a["bbox"][2] > 0 and a["bbox"][3] > 0]


def oracle_box(ann: dict[str, Any]) -> np.ndarray:
    """The GT box ``(x, y, w, h)`` grown to include every labelled keypoint of ``ann``."""
    kpts = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
    x, y, w, h = ann["bbox"]
    labelled = kpts[kpts[:, 2] > 0, :2]
    low = np.minimum([x, y], labelled.min(axis=0))
    high = np.maximum([x + w, y + h], labelled.max(axis=0))
    return np.concatenate([low, high - low])


def oracle_keypoints(codec: Codec, anns: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Encode -> decode each person's keypoints in its crop; returns image-px keypoints ``(N, K, 2)``
    and the mean decode error in input pixels over labelled joints that fell inside the heatmap."""
    height, width = codec.input_size
    heatmaps, offsets, truths, weights, to_image = [], [], [], [], []
    for ann in anns:
        kpts = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
        center, size = box_to_center_size(oracle_box(ann), aspect_wh=width / height)
        matrix = warp_matrix(center, size, 0.0, (width, height))
        crop_kpts = affine_points(kpts[:, :2], matrix)
        targets, weight = codec.encode(crop_kpts, kpts[:, 2])
        heatmaps.append(targets["heatmap"])
        offsets.append(targets.get("offset"))
        truths.append(crop_kpts)
        weights.append(weight)
        to_image.append(invert_affine(matrix))
    offset = torch.from_numpy(np.stack(offsets)) if codec.has_offsets else None
    decoded, _ = codec.decode(torch.from_numpy(np.stack(heatmaps)), offset)
    decoded = decoded.double().numpy()
    w = np.stack(weights) > 0
    error = float(np.linalg.norm(decoded - np.stack(truths), axis=-1)[w].mean()) if w.any() else float("nan")
    return to_image_coords(decoded, np.stack(to_image)), error


def score(gt: COCO, anns: list[dict[str, Any]], keypoints: np.ndarray) -> dict[str, float]:
    """COCOeval (iouType="keypoints") of the decoded people (score 1.0) against ``gt``."""
    results = [
        {
            "image_id": ann["image_id"],
            "category_id": 1,
            "keypoints": np.concatenate([kpts, np.ones((len(kpts), 1))], axis=1).ravel().tolist(),
            "score": 1.0,
        }
        for ann, kpts in zip(anns, keypoints, strict=True)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="keypoints")
        evaluator.params.imgIds = sorted({ann["image_id"] for ann in anns})
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"AP": 100 * stats[0], "AP50": 100 * stats[1], "AP75": 100 * stats[2], "AR": 100 * stats[5]}


def run_oracle(coco_root: Path, split: str, codec_name: str, input_size: str,
               gt: COCO | None = None) -> dict[str, Any]:
    """One benchmark row: ``{codec, input_size, split, AP, AP50, AP75, AR, instances, mean_error_input_px}``."""
    gt = gt if gt is not None else load_ground_truth(coco_root, split)
    anns = people(gt)
    if not anns:
        raise ValueError(f"no usable person annotations in the {split} split of {coco_root}")
    height, width = parse_size(input_size)
    codec = build_codec(codec_name, (height, width))
    keypoints, error = oracle_keypoints(codec, anns)
    row = {"codec": codec_name, "input_size": f"{height}x{width}", "split": split}
    row.update(score(gt, anns, keypoints))
    row.update({"instances": len(anns), "mean_error_input_px": error})
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="val split at 64x48 only (seconds)")
    parser.add_argument("--coco", type=Path, default=DEFAULT_COCO, help="COCO-layout folder (default: coco-mini)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=CODECS)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    splits, sizes = (["val"], ["64x48"]) if args.quick else (args.splits, args.sizes)
    cases = [(split, size, name) for split in splits for size in sizes for name in args.codecs]
    grounds = {split: load_ground_truth(args.coco, split) for split in splits}
    rows = [run_oracle(args.coco, split, name, size, grounds[split]) for split, size, name in tqdm(cases, desc="oracle")]
    print_table(rows, ["split", "input_size", "codec", "AP", "AP50", "AP75", "AR", "instances", "mean_error_input_px"])
    path = write_results("codec_oracle", rows, args.out, extra={"quick": args.quick, "coco": str(args.coco)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
