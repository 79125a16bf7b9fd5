"""pycocotools called directly, with no cal_core code on the way: the independent reference for AP checks."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np


def direct_pycocotools(gt_path: Path, results_path: Path) -> np.ndarray:
    """The 10 stats COCOeval (keypoints) prints for a results file against a ground-truth file."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = gt.loadRes(str(results_path))
        ev = COCOeval(gt, dt, "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats
