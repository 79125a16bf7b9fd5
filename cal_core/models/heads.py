"""Prediction heads and the pose network that joins a backbone to them.

Three layouts (docs/architecture.md, "models/"), named after the method that
uses them and sized after the paper's Table 1:

- ``heatmap`` (heatmap/dark, Eq. 3): one 1x1 convolution from the stride-4
  features to K heatmaps, as the pose HRNet of Sun et al. (HRNet-W32 28.5M).
- ``offset`` (udp, Eqs. 6-9): a single trunk; one residual block then a 1x1
  convolution to K heatmaps + 2K offsets (HRNet-W32 28.6M).
- ``dual`` (cal, Eqs. 10-15): the authors' layout. The last stage of the
  backbone (for HRNet: transition3 + stage 4) is built twice; the first copy
  feeds a residual block + 1x1 convolution to K heatmaps, the second a residual
  block + 1x1 convolution to 2K offsets, so the two targets stop competing for
  one set of features (HRNet-W32 49.3M, W48 110.3M).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

HEADS: tuple[str, ...] = ("heatmap", "offset", "dual")

#: Std of the final 1x1 convolutions' normal init (as in the pose HRNet): small
#: outputs at the start, so the heatmap regression starts near zero.
FINAL_INIT_STD = 0.001


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut (He et al.'s basic block), C -> C."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(y)) + x)


def init_weights(module: nn.Module) -> None:
    """He-normal (fan-out) convolutions and unit BatchNorm, the usual init for ReLU nets."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Predictor(nn.Module):
    """An optional residual block, then a 1x1 convolution to ``out_channels`` maps."""

    def __init__(self, in_channels: int, out_channels: int, refine: bool) -> None:
        super().__init__()
        self.block = ResidualBlock(in_channels) if refine else nn.Identity()
        self.final = nn.Conv2d(in_channels, out_channels, 1)
        init_weights(self.block)
        nn.init.normal_(self.final.weight, std=FINAL_INIT_STD)
        nn.init.zeros_(self.final.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.block(x))


class PoseNet(nn.Module):
    """Backbone (``shared`` then ``trunk``) plus one of the :data:`HEADS`.

    ``shared`` maps the image to whatever the trunk consumes (a tensor, or the
    list of HRNet branches); ``trunk`` maps that to stride-4 features with
    ``channels`` channels. For ``dual`` an independently initialised copy of
    the trunk, ``offset_trunk``, computes the offset features.
    Forward returns ``{"heatmap": (N, K, h, w)}`` plus ``"offset": (N, K, 2, h, w)``
    (x then y) for the offset layouts.
    """

    def __init__(self, shared: nn.Module, trunk: nn.Module, channels: int, head: str,
                 num_joints: int) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")
        if num_joints < 1:
            raise ValueError(f"num_joints must be positive, got {num_joints}")
        self.head = head
        self.num_joints = num_joints
        self.shared = shared
        self.trunk = trunk
        outputs = {"heatmap": num_joints, "offset": 3 * num_joints, "dual": num_joints}[head]
        self.heatmap_head = Predictor(channels, outputs, refine=head != "heatmap")
        if head == "dual":
            self.offset_trunk = copy.deepcopy(trunk)
            init_weights(self.offset_trunk)
            self.offset_head = Predictor(channels, 2 * num_joints, refine=True)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats: Any = self.shared(x)
        maps = self.heatmap_head(self.trunk(feats))
        k = self.num_joints
        if self.head == "heatmap":
            return {"heatmap": maps}
        if self.head == "offset":
            heatmap, offset = maps[:, :k], maps[:, k:]
        else:
            heatmap, offset = maps, self.offset_head(self.offset_trunk(feats))
        n, _, h, w = offset.shape
        return {"heatmap": heatmap, "offset": offset.reshape(n, k, 2, h, w)}
