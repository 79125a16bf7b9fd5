"""Atomic, ``weights_only``-loadable training checkpoints and the RNG state they carry.

A checkpoint is a ``torch.save`` dict of tensors and primitives only
(docs/architecture.md): ``model``, ``optimizer``, ``scheduler``, ``scaler``,
``epoch``, ``step``, ``rng``, ``config`` and ``code_version``. Random number
generator states (Python, NumPy, torch CPU and CUDA) are stored as tensors so
``torch.load(weights_only=True)`` reads them back: no pickled objects from
object storage (DESIGN.md §7).

Writes go through :func:`cal_core.storage.write_bytes`, which is atomic for
local paths (temporary file + rename) and for S3 (one PUT), so a run killed
while saving leaves the previous complete checkpoint in place.
"""

from __future__ import annotations

import functools
import io
import random
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cal_core import storage

#: File names inside a training run's --out folder.
LAST = "last.pt"
FINAL = "model.pt"


@functools.cache
def code_version() -> str:
    """The git commit of the source tree (``+dirty`` if modified), else the package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        return f"git:{commit}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        try:
            return f"cal-pose=={metadata.version('cal-pose')}"
        except metadata.PackageNotFoundError:
            return "unknown"


def rng_state() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch, CUDA) as tensors and primitives."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python_version": int(version),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_kind": str(kind),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached": float(cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where CUDA is available)."""
    py_state = tuple(int(v) for v in state["python"].tolist())
    random.setstate((state["python_version"], py_state, state["python_gauss"]))
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state((state["numpy_kind"], keys, state["numpy_pos"], state["numpy_has_gauss"],
                         state["numpy_cached"]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():  # as many GPUs as this process sees (a resume may see fewer)
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.to(torch.uint8), index)


def save(uri: str, state: dict[str, Any]) -> None:
    """Serialise ``state`` and write it atomically to ``uri`` (local path or s3://)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(uri, buffer.getvalue())


def load(uri: str) -> dict[str, Any]:
    """Read a checkpoint onto the CPU, as any weights file is read (:func:`cal_core.models.weights.load_file`).

    ``weights_only=True``; a missing file is a ``FileNotFoundError``, one torch
    cannot read a ``ValueError`` naming ``uri``; an S3 object is streamed to a
    temp file, not held in memory.
    """
    from cal_core.models.weights import load_file

    return load_file(uri)


def codec_from_config(config: dict[str, Any]) -> Any:
    """The codec a checkpoint was trained with: its method, input size and codec settings."""
    from cal_core.codecs import build_codec

    settings = {k: v for k, v in dict(config.get("codec") or {}).items() if k not in {"name", "input_size"}}
    return build_codec(config["method"], tuple(config["input_size"]), **settings)


def latest(out: str) -> str | None:
    """``<out>/last.pt`` if a complete resumable checkpoint exists there, else None."""
    uri = storage.join(out, LAST)
    return uri if storage.exists(uri) else None
