"""Shared fixtures: the real COCO sample, an isolated MLflow store, small synthetic shard sets."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(scope="session", autouse=True)
def isolated_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Point MLflow at a throw-away sqlite store for the whole session.

    Stages log to MLflow by default; without this, tests would write into the
    developer's ``runs/mlflow.db`` or, worse, a tracking server named in their
    environment. Tests that need another URI set it with ``monkeypatch``.
    """
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "CAL_POSE_PARENT_RUN_ID")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("CAL_POSE_PARENT_RUN_ID", None)
    yield uri
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny synthetic COCO set downsampled to shards: ``{"coco", "train", "val"}`` folders.

    40 train / 20 val people; train at 64x48 and 128x96, val at 64x48, laid out
    as ``<split>/<HxW>/{manifest.json, annotations.json, shard-*.parquet}``.
    """
    from cal_core.data import synthetic
    from cal_core.data.downsample import downsample

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root / "coco", 40, 20, seed=0)
    downsample(str(root / "coco"), "train", str(root / "shards" / "train"), ["64x48", "128x96"], workers=1, progress=False)
    downsample(str(root / "coco"), "val", str(root / "shards" / "val"), ["64x48"], workers=1, progress=False)
    return {"coco": root / "coco", "train": root / "shards" / "train", "val": root / "shards" / "val"}
