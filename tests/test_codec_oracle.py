"""Codec oracle on the real COCO sample: offsets remove quantization error, argmax does not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks import codec_oracle


def test_oracle_box_covers_labelled_keypoints() -> None:
    ann = {"bbox": [10, 10, 20, 40], "keypoints": [5, 12, 2, 50, 60, 1, 100, 100, 0] + [0, 0, 0] * 14}
    np.testing.assert_allclose(codec_oracle.oracle_box(ann), [5, 10, 45, 50])  # unlabelled (100, 100) ignored


def test_oracle_ap_on_val_at_64x48(coco_mini: Path) -> None:
    gt = codec_oracle.load_ground_truth(coco_mini, "val")
    rows = {name: codec_oracle.run_oracle(coco_mini, "val", name, "64x48", gt) for name in ("heatmap", "dark", "udp", "cal")}
    assert rows["udp"]["AP"] > 99 and rows["cal"]["AP"] > 99
    assert rows["udp"]["mean_error_input_px"] < 1e-3 and rows["cal"]["mean_error_input_px"] < 1e-3
    assert rows["heatmap"]["AP"] < 95  # measured 86.9: argmax quantization at a 16x12 heatmap
    assert rows["dark"]["AP"] > rows["heatmap"]["AP"] + 5
    assert rows["udp"]["instances"] == 68  # coco-mini val: non-crowd people with keypoints (README)


def test_cli_quick_writes_results(coco_mini: Path, tmp_path: Path) -> None:
    assert codec_oracle.main(["--quick", "--coco", str(coco_mini), "--out", str(tmp_path), "--codecs", "udp"]) == 0
    result = json.loads((tmp_path / "codec_oracle.json").read_text())
    assert result["benchmark"] == "codec_oracle" and result["quick"] is True
    assert [(r["codec"], r["input_size"], r["split"]) for r in result["rows"]] == [("udp", "64x48", "val")]
    assert {"machine", "versions", "command"} <= set(result)
