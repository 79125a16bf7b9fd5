"""Shared fixtures: the real COCO sample and small synthetic shard sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("CAL_POSE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
COCO_MINI = SHARED / "data" / "coco-mini"


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """The read-only real COCO slice in ../shared/data/coco-mini (skip when absent)."""
    if not (COCO_MINI / "annotations" / "person_keypoints_val2017.json").is_file():
        pytest.skip(f"real COCO sample not found at {COCO_MINI} (set CAL_POSE_SHARED to the shared/ folder)")
    return COCO_MINI
