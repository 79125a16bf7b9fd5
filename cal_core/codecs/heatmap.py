"""Heatmap codec (MSRA/HRNet, paper Sec. 3.1): Gaussian target (Eq. 2), argmax decode (Eq. 4).

The target is the Gaussian ``C`` of Eq. 2 centred on the exact sub-pixel joint
position in heatmap pixels (UDP geometry, see :mod:`cal_core.codecs.base`).
Decoding takes the argmax pixel, so it carries up to half a heatmap pixel of
quantization error per axis; the usual remedy (HRNet/SimpleBaseline) moves the
argmax a quarter pixel toward the higher of its two neighbours along each
axis, which halves the worst case. The shift needs both neighbours, so it is
applied only where ``1 <= x <= w - 2`` (resp. y).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from cal_core.codecs.base import Codec, CodecSettings, argmax_numpy, argmax_torch


class HeatmapCodec(Codec):
    """Gaussian heatmap target; argmax + quarter-pixel shift decode."""

    name: ClassVar[str] = "heatmap"

    def encode_torch(
        self, keypoints: torch.Tensor, visibility: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``{"heatmap": C (..., K, h, w)}`` per Eq. 2 and ``(..., K)`` weights; unweighted joints get zero maps."""
        joints_hm, weights = self.prepare(keypoints, visibility)
        return {"heatmap": self.gaussian(joints_hm)}, weights

    def decode(self, heatmap: torch.Tensor, offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Argmax (+ quarter shift) per map, in input pixels; ``offset`` is ignored (no offset head)."""
        self._check_heatmap(heatmap)
        index, xy, score = argmax_torch(heatmap)
        if self.settings.quarter_shift:
            xy = xy + quarter_shift_torch(heatmap, index, xy)
        stride = torch.as_tensor(self.stride, dtype=heatmap.dtype, device=heatmap.device)
        return xy * stride, score

    def decode_numpy(self, heatmap: np.ndarray, offset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Numpy reference of :meth:`decode`."""
        heatmap = np.asarray(heatmap, dtype=np.float64)
        self._check_heatmap(heatmap)
        _, xy, score = argmax_numpy(heatmap)
        if self.settings.quarter_shift:
            xy = xy + quarter_shift_numpy(heatmap, xy)
        return xy * self.stride, score


def quarter_shift_torch(heatmap: torch.Tensor, index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """``0.25 * sign(right - left)`` (and below - above) at the argmax, 0 at the map's border; ``(N, K, 2)``."""
    _, _, h, w = heatmap.shape
    flat = heatmap.reshape(heatmap.shape[0], heatmap.shape[1], -1)
    x, y = xy[..., 0], xy[..., 1]
    inner_x = ((x >= 1) & (x <= w - 2)).to(heatmap.dtype)
    inner_y = ((y >= 1) & (y <= h - 2)).to(heatmap.dtype)
    # neighbour indices clamped into the map; the masks above zero the shift where they were clamped
    left = index - (x >= 1).long()
    right = index + (x <= w - 2).long()
    up = index - w * (y >= 1).long()
    down = index + w * (y <= h - 2).long()
    values = flat.gather(-1, torch.stack([left, right, up, down], dim=-1))
    shift_x = torch.sign(values[..., 1] - values[..., 0]) * inner_x
    shift_y = torch.sign(values[..., 3] - values[..., 2]) * inner_y
    return 0.25 * torch.stack([shift_x, shift_y], dim=-1)


def quarter_shift_numpy(heatmap: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Numpy reference of :func:`quarter_shift_torch`, by indexing a padded copy of the maps."""
    n, k, h, w = heatmap.shape
    padded = np.pad(heatmap, ((0, 0), (0, 0), (1, 1), (1, 1)))
    nn, kk = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
    px, py = xy[..., 0].astype(int) + 1, xy[..., 1].astype(int) + 1
    shift_x = np.sign(padded[nn, kk, py, px + 1] - padded[nn, kk, py, px - 1])
    shift_y = np.sign(padded[nn, kk, py + 1, px] - padded[nn, kk, py - 1, px])
    shift_x = np.where((xy[..., 0] >= 1) & (xy[..., 0] <= w - 2), shift_x, 0.0)
    shift_y = np.where((xy[..., 1] >= 1) & (xy[..., 1] <= h - 2), shift_y, 0.0)
    return 0.25 * np.stack([shift_x, shift_y], axis=-1)


#: Per input size (H, W): sigma 2 at 256x192 is HRNet's; the authors' 128x96 config uses 1.0. At
#: 64x48 the authors set 0.3 for their CAL target, which leaves a nearly one-hot map that DARK cannot
#: read; the Gaussian baselines keep 1.0 there (heatmap pixels). radius/offset_norm are unused here.
HEATMAP_DEFAULTS: dict[tuple[int, int], CodecSettings] = {
    (64, 48): CodecSettings(sigma=1.0, radius=4.0, offset_norm=1.5, blur_kernel=3),
    (128, 96): CodecSettings(sigma=1.0, radius=4.0, offset_norm=1.5, blur_kernel=3),
    (256, 192): CodecSettings(sigma=2.0, radius=4.0, offset_norm=1.5, blur_kernel=11),
}
