"""The stage images the components run in: registry prefix and tag, in one place.

Set ``CAL_POSE_IMAGE_REGISTRY`` (default ``localhost/cal-pose``, where
``make images`` tags its builds) and ``CAL_POSE_IMAGE_TAG`` (default: the
package version) before ``make compile`` to point the compiled pipeline at
your registry, e.g. ``CAL_POSE_IMAGE_REGISTRY=registry.example.com/ml``.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

REGISTRY_ENV = "CAL_POSE_IMAGE_REGISTRY"
TAG_ENV = "CAL_POSE_IMAGE_TAG"
DEFAULT_REGISTRY = "localhost/cal-pose"
#: image name -> what runs in it (images/Dockerfile.<name>)
IMAGES = {
    "data": "downsample (and the pipeline's MLflow parent run)",
    "train": "train stage 1 and 2 (CUDA torch)",
    "gmm": "fit_gmm (torch + scikit-learn)",
    "export": "export_onnx (torch + onnx + onnxruntime)",
    "eval": "evaluate and register (onnxruntime + pycocotools + MLflow)",
}


def default_tag() -> str:
    """The installed cal-pose version (images are tagged with it)."""
    try:
        return version("cal-pose")
    except PackageNotFoundError:
        return "latest"


def registry() -> str:
    """The registry prefix, without a trailing slash."""
    return (os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY).rstrip("/")


def tag() -> str:
    """The image tag shared by all stage images."""
    return os.environ.get(TAG_ENV) or default_tag()


def image(name: str) -> str:
    """Full reference of stage image ``name`` (one of :data:`IMAGES`), e.g. ``localhost/cal-pose/train:0.1.0``."""
    if name not in IMAGES:
        raise KeyError(f"unknown stage image {name!r}; known: {', '.join(IMAGES)}")
    return f"{registry()}/{name}:{tag()}"
