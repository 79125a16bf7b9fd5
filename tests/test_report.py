"""cal_core.report: tables, OKS histogram and skeleton overlays."""

from __future__ import annotations

import numpy as np

from cal_core import report
from cal_core.skeleton import NUM_KEYPOINTS


def test_metrics_table_is_table8_in_percent() -> None:
    row = {"method": "cal", "backbone": "hrnet_w32", "input_size": "64x48", "AP": 0.584, "AP50": 0.866,
           "AP75": 0.651, "APM": -1.0, "APL": 0.605, "AR": 0.648}
    lines = report.metrics_table([row]).splitlines()
    assert lines[0] == "| Method | Backbone | Input size | AP | AP50 | AP75 | APM | APL | AR |"
    assert lines[2] == "| cal | hrnet_w32 | 64x48 | 58.4 | 86.6 | 65.1 | - | 60.5 | 64.8 |"


def test_keypoint_error_table_and_histogram_counts() -> None:
    errors = np.arange(NUM_KEYPOINTS, dtype=float)
    counts = np.ones(NUM_KEYPOINTS, dtype=int)
    counts[3] = 0
    table = report.keypoint_error_table(errors, counts).splitlines()
    assert table[2] == "| nose | 0.00 | 1 |" and table[5] == "| left_ear | - | 0 |"
    text = report.oks_histogram_text(np.array([0.0, 0.05, 0.55, 0.95, 1.0]))
    rows = text.splitlines()[2:]
    assert rows[0] == "| 0.0-0.1 | 2 |" and rows[5] == "| 0.5-0.6 | 1 |" and rows[9] == "| 0.9-1.0 | 2 |"


def test_overlay_draws_confident_joints_only() -> None:
    image = np.zeros((16, 12, 3), np.uint8)
    kpts = np.tile([[6.0, 8.0]], (NUM_KEYPOINTS, 1))
    kpts[0] = [2.0, 2.0]
    scores = np.zeros(NUM_KEYPOINTS)
    scores[0] = 0.9
    canvas = np.asarray(report.draw_overlay(image, kpts, scores, scale=4))
    assert canvas.shape == (64, 48, 3)
    # joint 0 at (2, 2) -> canvas centre (9.5, 9.5): its ring passes 3 px to the left
    assert canvas[9:11, 5:8].any()
    # the low-score joints at (6, 8) are not drawn, nor any limb (it needs two confident ends)
    assert not canvas[28:40, 20:32].any()
