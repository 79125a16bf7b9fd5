"""DARK decoding (Zhang et al., "Distribution-Aware Coordinate Representation for Human
Pose Estimation", CVPR 2020): Gaussian target as :mod:`heatmap`, sub-pixel decode.

The argmax ``m`` of the raw heatmap is refined by one Newton step on the log of
the smoothed heatmap ``L = log(max(blur(H), 1e-10))``: ``y = m - H_L(m)^-1 grad_L(m)``.
For an exact Gaussian ``L`` is a quadratic, so the step lands on the centre.

Choices, stated because the heatmaps here are tiny (16x12 at 64x48):
- ``blur`` is a ``blur_kernel`` x ``blur_kernel`` Gaussian with OpenCV's
  default taps for that size (:func:`blur_kernel_1d`) and zero padding, as
  DARK's ``cv2.GaussianBlur`` on a zero-bordered map. DARK also rescales the
  blurred map to the raw maximum; the log's derivatives ignore a constant
  factor, so that step is left out.
- Derivatives use 3-point central differences (``L[x+1] - 2 L[x] + L[x-1]``),
  exact for a quadratic like DARK's 5-point ones, but needing only the 3x3
  neighbourhood, so joints one pixel from the border are refined too.
- The step is taken only where that neighbourhood exists and the Hessian is
  negative definite (a true maximum), and is clipped to half a heatmap pixel
  per axis: the argmax pixel of an isotropic single-peak map is the pixel
  nearest its peak, so the peak lies within half a pixel of it.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from cal_core.codecs.base import argmax_numpy, argmax_torch
from cal_core.codecs.heatmap import HeatmapCodec

LOG_FLOOR = 1e-10
#: Largest refinement per axis, heatmap pixels.
MAX_STEP = 0.5


#: OpenCV's fixed taps for small kernels given sigma 0 (``getGaussianKernel``'s ``small_gaussian_tab``).
_OPENCV_SMALL_TAPS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    3: (0.25, 0.5, 0.25),
    5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
    7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125),
}


def blur_kernel_1d(kernel: int) -> np.ndarray:
    """Normalised 1-D Gaussian taps of length ``kernel``, as ``cv2.getGaussianKernel(kernel, 0)``.

    OpenCV (hence DARK's ``cv2.GaussianBlur(..., 0)``) uses fixed taps up to 7
    and otherwise samples a Gaussian of sigma ``0.3 * ((kernel - 1) / 2 - 1) + 0.8``.
    """
    if kernel in _OPENCV_SMALL_TAPS:
        return np.array(_OPENCV_SMALL_TAPS[kernel])
    taps = np.arange(kernel) - (kernel - 1) / 2
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    g = np.exp(-(taps**2) / (2 * sigma**2))
    return g / g.sum()


class DarkCodec(HeatmapCodec):
    """Gaussian heatmap target; DARK Taylor-refined decode."""

    name: ClassVar[str] = "dark"

    def decode(self, heatmap: torch.Tensor, offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Argmax refined by a Newton step on the smoothed log heatmap, in input pixels."""
        self._check_heatmap(heatmap)
        n, k, h, w = heatmap.shape
        index, xy, score = argmax_torch(heatmap)
        stride = torch.as_tensor(self.stride, dtype=heatmap.dtype, device=heatmap.device)
        if h < 3 or w < 3:  # no pixel has the 3x3 neighbourhood the Newton step reads: plain argmax
            return xy * stride, score
        taps = blur_kernel_1d(self.settings.blur_kernel)
        weight = torch.as_tensor(np.tile(np.outer(taps, taps), (k, 1, 1, 1)), dtype=torch.float32, device=heatmap.device)
        # float32 even under AMP: LOG_FLOOR underflows to 0 in float16 and the log would be -inf
        smooth = F.conv2d(heatmap.float(), weight, padding=self.settings.blur_kernel // 2, groups=k)
        log = torch.log(smooth.clamp(min=LOG_FLOOR)).reshape(n, k, h * w)
        x, y = xy[..., 0], xy[..., 1]
        inner = (x >= 1) & (x <= w - 2) & (y >= 1) & (y <= h - 2)
        centre = torch.where(inner, index, torch.full_like(index, w + 1))  # any inner pixel keeps gather valid
        steps = torch.tensor([0, -1, 1, -w, w, -w - 1, -w + 1, w - 1, w + 1], device=heatmap.device)
        v = log.gather(-1, centre.unsqueeze(-1) + steps)
        step = _newton_step(v[..., 0], v[..., 1], v[..., 2], v[..., 3], v[..., 4], v[..., 5:])
        step = torch.where(inner.unsqueeze(-1), step, torch.zeros_like(step)).to(heatmap.dtype)
        return (xy + step) * stride, score

    def decode_numpy(self, heatmap: np.ndarray, offset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Numpy reference of :meth:`decode` (blur by explicit sliding windows)."""
        heatmap = np.asarray(heatmap, dtype=np.float64)
        self._check_heatmap(heatmap)
        _, h, w = heatmap.shape[1:]
        _, xy, score = argmax_numpy(heatmap)
        if h < 3 or w < 3:  # as decode: no 3x3 neighbourhood anywhere
            return xy * self.stride, score
        kernel = self.settings.blur_kernel
        g = blur_kernel_1d(kernel)
        pad = kernel // 2
        padded = np.pad(heatmap, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel, kernel), axis=(2, 3))
        log = np.log(np.maximum(np.einsum("nkhwij,i,j->nkhw", windows, g, g), LOG_FLOOR))
        px, py = xy[..., 0].astype(int), xy[..., 1].astype(int)
        inner = (px >= 1) & (px <= w - 2) & (py >= 1) & (py <= h - 2)
        px, py = np.where(inner, px, 1), np.where(inner, py, 1)
        nn, kk = np.meshgrid(np.arange(heatmap.shape[0]), np.arange(heatmap.shape[1]), indexing="ij")

        def at(dx: int, dy: int) -> np.ndarray:
            return log[nn, kk, py + dy, px + dx]

        grad = np.stack([(at(1, 0) - at(-1, 0)) / 2, (at(0, 1) - at(0, -1)) / 2], axis=-1)
        dxx = at(1, 0) - 2 * at(0, 0) + at(-1, 0)
        dyy = at(0, 1) - 2 * at(0, 0) + at(0, -1)
        dxy = (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1)) / 4
        hessian = np.stack([np.stack([dxx, dxy], -1), np.stack([dxy, dyy], -1)], -2)
        det = dxx * dyy - dxy**2
        ok = inner & (det > 0) & (dxx < 0)
        safe = np.where(ok[..., None, None], hessian, -np.eye(2))
        step = -np.linalg.solve(safe, grad[..., None])[..., 0]
        step = np.where(ok[..., None], np.clip(step, -MAX_STEP, MAX_STEP), 0.0)
        return (xy + step) * self.stride, score


def _newton_step(
    c: torch.Tensor, left: torch.Tensor, right: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
    diagonals: torch.Tensor,
) -> torch.Tensor:
    """``-H^-1 g`` from the 3x3 log neighbourhood (diagonals: up-left, up-right, down-left, down-right).

    Zero where the Hessian is not negative definite; clipped to ``MAX_STEP`` per axis.
    """
    gx, gy = (right - left) / 2, (down - up) / 2
    dxx, dyy = right - 2 * c + left, down - 2 * c + up
    dxy = (diagonals[..., 3] - diagonals[..., 1] - diagonals[..., 2] + diagonals[..., 0]) / 4
    det = dxx * dyy - dxy * dxy
    ok = (det > 0) & (dxx < 0)
    safe_det = torch.where(ok, det, torch.ones_like(det))
    step_x = -(dyy * gx - dxy * gy) / safe_det
    step_y = -(dxx * gy - dxy * gx) / safe_det
    step = torch.stack([step_x, step_y], dim=-1).clamp(-MAX_STEP, MAX_STEP)
    return torch.where(ok.unsqueeze(-1), step, torch.zeros_like(step))
