"""Tiny synthetic shard sets for the training and DDP tests (built once per module that uses them)."""

from __future__ import annotations

import pytest


def build_tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """~40 synthetic people downsampled to 64x48 train and val shards."""
    from cal_core.cli import main as cli

    root = tmp_path_factory.mktemp("tiny-shards")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CAL_POSE_TRACKING", "off")
        patch.chdir(root)  # the offline tracking file goes to ./runs/offline: keep it out of the checkout
        assert cli(["synth", "--out", str(root / "coco"), "--train", "40", "--val", "12", "--seed", "5"]) == 0
        for split in ("train", "val"):
            assert cli(["downsample", "--coco", str(root / "coco"), "--split", split, "--out", str(root / split),
                        "--input-size", "64x48", "--workers", "1"]) == 0
    return {"train": str(root / "train" / "64x48"), "val": str(root / "val" / "64x48")}
