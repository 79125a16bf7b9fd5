"""DARK decoding (Zhang et al., "Distribution-Aware Coordinate Representation for Human
Pose Estimation", CVPR 2020): Gaussian target as :mod:`heatmap`, sub-pixel decode.

The argmax ``m`` of the raw heatmap is refined by one Newton step on the log of
the smoothed heatmap ``L = log(max(blur(H), 1e-10))``: ``y = m - H_L(m)^-1 grad_L(m)``.
For an exact Gaussian ``L`` is a quadratic, so the step lands on the centre.

Choices, stated because the heatmaps here are tiny (16x12 at 64x48):
- ``blur`` is a ``blur_kernel`` x ``blur_kernel`` Gaussian with OpenCV's
  default taps for that size (:mod:`cal_core.codecs.blur`) and zero padding, as
  DARK's ``cv2.GaussianBlur`` on a zero-bordered map. DARK also rescales the
  blurred map to the raw maximum; the log's derivatives ignore a constant
  factor, so that step is left out.
- Derivatives use 3-point central differences (``L[x+1] - 2 L[x] + L[x-1]``),
  exact for a quadratic like DARK's 5-point ones, but needing only the 3x3
  neighbourhood.
- Near the border the zero padding bends ``L``: the blur mixes in zeros
  where the target would go on, and the step then points inward. DARK and
  mmpose refine only 2 or more pixels from the border, but where the bend
  ends depends on sigma and the kernel (at 256x192, sigma 2 and kernel 11,
  the step is worse than the quarter shift 1 and 2 pixels in: mean error
  0.45 and 0.22 heatmap px against 0.13; at 64x48, kernel 3, it is better
  from 1 pixel in: 0.05). :func:`reliable_border` measures, once per
  setting, the distance from which the step beats the quarter shift on
  exact targets; closer in, the decode is the heatmap codec's (argmax +
  quarter shift), where DARK's reference keeps the bare argmax.
- The step is taken only where the Hessian is negative definite (a true
  maximum) and is clipped to half a heatmap pixel per axis: the argmax pixel
  of an isotropic single-peak map is the pixel nearest its peak, so the peak
  lies within half a pixel of it.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np
import torch

from cal_core.codecs.base import argmax_numpy, argmax_torch
from cal_core.codecs.blur import blur_kernel_1d, blur_numpy, blur_torch
from cal_core.codecs.heatmap import HeatmapCodec, quarter_shift_numpy, quarter_shift_torch

LOG_FLOOR = 1e-10
#: Largest refinement per axis, heatmap pixels.
MAX_STEP = 0.5


class DarkCodec(HeatmapCodec):
    """Gaussian heatmap target; DARK Taylor-refined decode."""

    name: ClassVar[str] = "dark"

    @property
    def border(self) -> int:
        """Pixels from the map's edge from which the Newton step is taken (:func:`reliable_border`)."""
        return reliable_border(self.settings.sigma, self.settings.blur_kernel)

    def decode(self, heatmap: torch.Tensor, offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Argmax refined by a Newton step on the smoothed log heatmap, in input pixels."""
        self._check_heatmap(heatmap)
        n, k, h, w = heatmap.shape
        index, xy, score = argmax_torch(heatmap)
        stride = torch.as_tensor(self.stride, dtype=heatmap.dtype, device=heatmap.device)
        # the heatmap codec's shift wherever no Newton step is taken
        shift = quarter_shift_torch(heatmap, index, xy) if self.settings.quarter_shift else torch.zeros_like(xy)
        if h < 3 or w < 3:  # no pixel has the 3x3 neighbourhood the Newton step reads
            return (xy + shift) * stride, score
        # float32 even under AMP: LOG_FLOOR underflows to 0 in float16 and the log would be -inf
        smooth = blur_torch(heatmap, self.settings.blur_kernel, "zero")
        log = torch.log(smooth.clamp(min=LOG_FLOOR)).reshape(n, k, h * w)
        x, y, e = xy[..., 0], xy[..., 1], self.border
        inner = (x >= e) & (x <= w - 1 - e) & (y >= e) & (y <= h - 1 - e)
        centre = torch.where(inner, index, torch.full_like(index, w + 1))  # any inner pixel keeps gather valid
        steps = torch.tensor([0, -1, 1, -w, w, -w - 1, -w + 1, w - 1, w + 1], device=heatmap.device)
        v = log.gather(-1, centre.unsqueeze(-1) + steps)
        step, ok = _newton_step(v[..., 0], v[..., 1], v[..., 2], v[..., 3], v[..., 4], v[..., 5:])
        shift = torch.where((inner & ok).unsqueeze(-1), step.to(shift.dtype), shift)
        return (xy + shift) * stride, score

    def decode_numpy(self, heatmap: np.ndarray, offset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Numpy reference of :meth:`decode` (blur by explicit sliding windows)."""
        heatmap = np.asarray(heatmap, dtype=np.float64)
        self._check_heatmap(heatmap)
        _, h, w = heatmap.shape[1:]
        _, xy, score = argmax_numpy(heatmap)
        shift = quarter_shift_numpy(heatmap, xy) if self.settings.quarter_shift else np.zeros_like(xy)
        if h < 3 or w < 3:  # as decode: no 3x3 neighbourhood anywhere
            return (xy + shift) * self.stride, score
        log = np.log(np.maximum(blur_numpy(heatmap, self.settings.blur_kernel, "zero"), LOG_FLOOR))
        px, py, e = xy[..., 0].astype(int), xy[..., 1].astype(int), self.border
        inner = (px >= e) & (px <= w - 1 - e) & (py >= e) & (py <= h - 1 - e)
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
        shift = np.where(ok[..., None], np.clip(step, -MAX_STEP, MAX_STEP), shift)
        return (xy + shift) * self.stride, score


def _newton_step(
    c: torch.Tensor, left: torch.Tensor, right: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
    diagonals: torch.Tensor,
) -> torch.Tensor:
    """``(-H^-1 g, ok)`` from the 3x3 log neighbourhood (diagonals: up-left, up-right, down-left, down-right).

    ``ok`` where the Hessian is negative definite: the step, clipped to ``MAX_STEP`` per axis, means
    something only there (the caller keeps its fallback elsewhere).
    """
    gx, gy = (right - left) / 2, (down - up) / 2
    dxx, dyy = right - 2 * c + left, down - 2 * c + up
    dxy = (diagonals[..., 3] - diagonals[..., 1] - diagonals[..., 2] + diagonals[..., 0]) / 4
    det = dxx * dyy - dxy * dxy
    ok = (det > 0) & (dxx < 0)
    safe_det = torch.where(ok, det, torch.ones_like(det))
    step_x = -(dyy * gx - dxy * gy) / safe_det
    step_y = -(dxx * gy - dxy * gx) / safe_det
    return torch.stack([step_x, step_y], dim=-1).clamp(-MAX_STEP, MAX_STEP), ok


@functools.lru_cache(maxsize=64)
def reliable_border(sigma: float, kernel: int, phases: int = 64) -> int:
    """Smallest distance from the edge (heatmap px, >= 1) from which DARK's step beats the quarter shift.

    Measured on exact Gaussian targets of ``sigma`` in one dimension (target
    and blur are separable, so the x part of the 2-D step is the 1-D step):
    joints at ``phases`` sub-pixel positions around each pixel ``d``, blurred
    with ``kernel`` and zero padding, stepped as :meth:`DarkCodec.decode`
    steps; the answer is the ``d`` from which the mean error stays below the
    quarter shift's (which is 0.125 px on exact targets).
    """
    half = kernel // 2 + int(np.ceil(6 * sigma)) + 2  # past this the edge no longer reaches the step
    xs = np.arange(2 * half + 3, dtype=np.float64)
    taps = blur_kernel_1d(kernel)
    better = []
    for d in range(1, half + 1):
        mu = d + (np.arange(phases) + 0.5) / phases - 0.5
        target = np.exp(-((xs[None] - mu[:, None]) ** 2) / (2 * sigma**2))
        smooth = np.stack([np.convolve(row, taps, mode="same") for row in target])
        log = np.log(np.maximum(smooth, LOG_FLOOR))[:, d - 1:d + 2]
        grad, curve = (log[:, 2] - log[:, 0]) / 2, log[:, 2] - 2 * log[:, 1] + log[:, 0]
        step = np.where(curve < 0, np.clip(-grad / np.where(curve < 0, curve, -1.0), -MAX_STEP, MAX_STEP), 0.0)
        quarter = 0.25 * np.sign(target[:, d + 1] - target[:, d - 1])
        better.append(np.abs(d + step - mu).mean() < np.abs(d + quarter - mu).mean())
    worse = [d for d, ok in enumerate(better, start=1) if not ok]
    return max(worse) + 1 if worse else 1
