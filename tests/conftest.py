"""Shared fixtures: the real COCO sample and an isolated MLflow store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("CAL_POSE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
COCO_MINI = SHARED / "data" / "coco-mini"


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """The read-only real COCO slice in ../shared/data/coco-mini (skip, naming what is missing, when incomplete).

    Both splits' annotations and image folders are checked: a partial copy
    would otherwise fail tests with unrelated-looking ``FileNotFoundError``s.
    """
    needed = [COCO_MINI / "annotations" / f"person_keypoints_{split}2017.json" for split in ("train", "val")]
    needed += [COCO_MINI / f"{split}2017" for split in ("train", "val")]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        pytest.skip(f"real COCO sample incomplete at {COCO_MINI}: missing {', '.join(missing)} "
                    "(set CAL_POSE_SHARED to the shared/ folder)")
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
