"""Pose networks: ``build_model(backbone, head)`` and checkpoint loading.

Every model maps a normalised RGB batch ``(N, 3, H, W)`` to
``{"heatmap": (N, K, H/4, W/4)}`` plus ``"offset": (N, K, 2, H/4, W/4)`` for
the offset heads (docs/architecture.md). Backbones are in backbones.py and
hrnet.py, heads in heads.py. Nothing is pretrained unless the user passes
``weights``; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from cal_core.models.backbones import BACKBONES, build_backbone
from cal_core.models.heads import HEADS, PoseNet
from cal_core.models.weights import load_file, load_weights

__all__ = ["BACKBONES", "HEADS", "MEAN", "STD", "PoseNet", "build_model", "count_parameters",
           "default_head", "load_checkpoint", "model_from_checkpoint"]

#: ImageNet channel statistics (RGB, images scaled to [0, 1]) the inputs are normalised with.
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Method -> head layout: heatmap/dark need heatmaps only (Eq. 3), udp a single
#: trunk with offsets (Eqs. 6-9), cal the authors' dual branch (Eqs. 10-15).
METHOD_HEADS: dict[str, str] = {"heatmap": "heatmap", "dark": "heatmap", "udp": "offset", "cal": "dual"}


def default_head(method: str) -> str:
    """The head layout the paper uses for ``method`` (one of heatmap, dark, udp, cal)."""
    if method not in METHOD_HEADS:
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(METHOD_HEADS)}")
    return METHOD_HEADS[method]


def build_model(backbone: str, head: str, num_joints: int = 17, input_size: tuple[int, int] = (128, 96),
                weights: str | Path | None = None) -> PoseNet:
    """A pose network for inputs of ``input_size`` ``(H, W)`` (both multiples of 4).

    ``weights`` is an optional local path or URI to a state dict the user
    supplies: a full model state dict, or a backbone (e.g. ImageNet) one; see
    :func:`cal_core.models.weights.load_weights`. ``model.arch`` records these
    arguments (backbone, head, num_joints, input_size) for checkpoints and export.
    """
    height, width = (int(v) for v in input_size)
    if height <= 0 or width <= 0 or height % 4 or width % 4:
        raise ValueError(f"input_size must be positive multiples of 4 (H, W), got {tuple(input_size)}")
    shared, trunk, channels = build_backbone(backbone)
    model = PoseNet(shared, trunk, channels, head, num_joints)
    model.arch = {"backbone": backbone, "head": head, "num_joints": num_joints,
                  "input_size": (height, width)}
    if weights is not None:
        load_weights(model, weights)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (the paper's #Params, Table 1), optionally only the trainable ones."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def load_checkpoint(uri: str | Path) -> dict[str, Any]:
    """A training checkpoint dict from a local path or ``s3://`` URI (``weights_only=True``, on the CPU)."""
    ckpt = load_file(uri)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{uri} is not a cal-pose checkpoint (needs 'model' and 'config' entries)")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> PoseNet:
    """Rebuild the model described by ``ckpt["config"]`` and load ``ckpt["model"]`` strictly.

    ``config`` needs ``backbone``, ``input_size`` and ``head`` (or ``method``,
    mapped by :func:`default_head`); ``num_joints`` defaults to 17.
    """
    config = ckpt.get("config")
    if not isinstance(config, dict) or "model" not in ckpt:
        raise ValueError("checkpoint needs a 'config' dict and a 'model' state dict")
    missing = [k for k in ("backbone", "input_size") if k not in config]
    if missing or ("head" not in config and "method" not in config):
        raise ValueError(f"checkpoint config lacks {missing or ['head']}: has {sorted(config)}")
    head = config.get("head") or default_head(config["method"])
    size = config["input_size"]
    if isinstance(size, str):
        size = tuple(int(v) for v in size.lower().split("x"))
    model = build_model(config["backbone"], head, int(config.get("num_joints", 17)), tuple(size))
    model.load_state_dict(ckpt["model"], strict=True)
    return model
