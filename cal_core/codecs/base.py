"""What every codec shares: heatmap geometry (UDP), per-resolution settings, argmax decoding.

A codec turns keypoints in input pixels into training targets on the
heatmap grid (``encode``) and turns network outputs back into keypoints in
input pixels (``decode`` in torch, ``decode_numpy`` as the reference).

Heatmap geometry follows UDP (Huang et al., CVPR 2020): the heatmap is
``input // 4`` and the input -> heatmap scale is ``(W_hm - 1) / (W_in - 1)``
along x and ``(H_hm - 1) / (H_in - 1)`` along y, so the first and last pixel
centres of the input and of the heatmap coincide and no half-pixel bias
enters encode or decode.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch

#: Heatmap stride of every backbone (output = input / 4).
HEATMAP_STRIDE = 4

Targets = dict[str, np.ndarray]
#: Where ``Codec.prepare`` puts unweighted joints (heatmap px): so far off the map that
#: every distance-based target (Gaussian, disk, offsets) is exactly zero for them.
_FAR = -1e4
#: Gaussian factors below exp(_LOG_TINY) ~ 1e-10 are flushed to 0 (see ``Codec.gaussian``).
_LOG_TINY = -23.0


@dataclass(frozen=True)
class CodecSettings:
    """Per-method, per-resolution target parameters, all in heatmap pixels.

    ``sigma`` is the Gaussian standard deviation of Eq. 2, ``radius`` the disk
    radius R of Eqs. 6-7 and ``offset_norm`` the length the offsets of Eq. 7 are
    divided by in the targets (and multiplied by again when decoding).
    ``blur_kernel`` is the decode's smoothing kernel size (odd; DARK before its
    Taylor step, UDP before its argmax) and ``quarter_shift``
    switches the heatmap codec's quarter-pixel shift toward the higher neighbour.
    """

    sigma: float
    radius: float
    offset_norm: float
    blur_kernel: int = 3
    quarter_shift: bool = True


class Codec(ABC):
    """Encode keypoints (input px) as targets on the heatmap grid and decode network outputs back."""

    name: ClassVar[str]
    has_offsets: ClassVar[bool] = False

    def __init__(self, input_size: tuple[int, int], settings: CodecSettings) -> None:
        height, width = (int(v) for v in input_size)
        if height < 2 * HEATMAP_STRIDE or width < 2 * HEATMAP_STRIDE:
            raise ValueError(f"input_size {input_size} too small: the heatmap (input / 4) needs >= 2x2 pixels")
        if settings.sigma <= 0 or settings.radius <= 0 or settings.offset_norm <= 0:
            raise ValueError(f"sigma, radius and offset_norm must be positive, got {settings}")
        if settings.blur_kernel < 1 or settings.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be a positive odd integer, got {settings.blur_kernel}")
        self.input_size = (height, width)
        self.heatmap_size = (height // HEATMAP_STRIDE, width // HEATMAP_STRIDE)
        self.settings = settings
        hm_h, hm_w = self.heatmap_size
        #: input px per heatmap px along (x, y): (W_in - 1) / (W_hm - 1), (H_in - 1) / (H_hm - 1)
        self.stride = np.array([(width - 1) / (hm_w - 1), (height - 1) / (hm_h - 1)])

    @property
    def sigma(self) -> float:
        return self.settings.sigma

    @property
    def radius(self) -> float:
        return self.settings.radius

    @property
    def offset_norm(self) -> float:
        return self.settings.offset_norm

    def config(self) -> dict[str, object]:
        """Plain-data description (name, input size, settings) for checkpoints and run tracking."""
        return {"name": self.name, "input_size": list(self.input_size), **asdict(self.settings)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(input_size={self.input_size}, {self.settings})"

    def input_to_heatmap(self, points: np.ndarray) -> np.ndarray:
        """Points ``(..., 2)`` in input pixels -> heatmap pixels (UDP scale)."""
        return np.asarray(points, dtype=np.float64) / self.stride

    def heatmap_to_input(self, points: np.ndarray) -> np.ndarray:
        """Points ``(..., 2)`` in heatmap pixels -> input pixels (UDP scale)."""
        return np.asarray(points, dtype=np.float64) * self.stride

    def input_to_heatmap_torch(self, points: torch.Tensor) -> torch.Tensor:
        """:meth:`input_to_heatmap` for tensors ``(..., 2)`` on any device, computed in float64."""
        return points.double() / torch.as_tensor(self.stride, dtype=torch.float64, device=points.device)

    def joint_weights(self, joints_hm: torch.Tensor, visibility: torch.Tensor) -> torch.Tensor:
        """``(..., K)`` float32: 1 where a joint is labelled (``v > 0``) and its nearest heatmap pixel exists.

        NaN or infinite coordinates fail every comparison, so they get weight 0 too.
        """
        hm_h, hm_w = self.heatmap_size
        x, y = joints_hm[..., 0], joints_hm[..., 1]
        inside = (x >= -0.5) & (x < hm_w - 0.5) & (y >= -0.5) & (y < hm_h - 0.5)
        return ((visibility > 0) & inside).float()

    def joint_labels(self, keypoints: torch.Tensor, visibility: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keypoints ``(..., K, 2)`` input px -> joints in heatmap px (float64) and their weights ``(..., K)``."""
        joints_hm = self.input_to_heatmap_torch(keypoints)
        return joints_hm, self.joint_weights(joints_hm, visibility)

    def prepare(self, keypoints: torch.Tensor, visibility: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked joints in heatmap px ``(..., K, 2)`` float32 and their weights ``(..., K)``.

        The input -> heatmap scale runs in float64 (as the numpy geometry does), then
        float32. Unweighted joints are moved far outside the map (:data:`_FAR`), so
        every target built from distances to them (Gaussian, disk, offsets) is zero
        there without a separate masking pass.
        """
        if keypoints.dim() < 2 or keypoints.shape[-1] != 2 or visibility.shape != keypoints.shape[:-1]:
            raise ValueError(
                f"encode needs keypoints (..., K, 2) and visibility (..., K), "
                f"got {tuple(keypoints.shape)}, {tuple(visibility.shape)}"
            )
        joints_hm, weights = self.joint_labels(keypoints, visibility)
        return torch.where(weights[..., None] > 0, joints_hm, float(_FAR)).float(), weights

    def axis_distances(self, joints_hm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per joint, ``p - y`` along x ``(..., K, w)`` and along y ``(..., K, h)`` (heatmap px)."""
        hm_h, hm_w = self.heatmap_size
        device = joints_hm.device
        dx = torch.arange(hm_w, dtype=joints_hm.dtype, device=device) - joints_hm[..., 0, None]
        dy = torch.arange(hm_h, dtype=joints_hm.dtype, device=device) - joints_hm[..., 1, None]
        return dx, dy

    def gaussian(self, joints_hm: torch.Tensor) -> torch.Tensor:
        """Eq. 2: ``C(p) = exp(-|p - y|^2 / (2 sigma^2))`` at the exact sub-pixel joint, ``(..., K, h, w)``.

        Computed separably, ``exp(-dx^2 / 2s^2) * exp(-dy^2 / 2s^2)``, which is the
        same function with h + w instead of h * w exponentials per joint. Joints
        placed at :data:`_FAR` by :meth:`prepare` give all-zero maps. Factors
        below ``exp(_LOG_TINY)`` (1e-10 of the peak) are set to exactly 0: their
        products would be float32 denormals, which cost a CPU ~100x per operation.
        """
        scale = -0.5 / self.sigma**2
        dx, dy = self.axis_distances(joints_hm)
        ex, ey = dx * dx * scale, dy * dy * scale
        ex[ex < _LOG_TINY] = -math.inf
        ey[ey < _LOG_TINY] = -math.inf
        return torch.exp(ey)[..., :, None] * torch.exp(ex)[..., None, :]

    def encode(self, keypoints: np.ndarray, visibility: np.ndarray) -> tuple[Targets, np.ndarray]:
        """Numpy in and out: :meth:`encode_torch` on the CPU for one person ``(K, 2)`` or a batch ``(..., K, 2)``."""
        targets, weights = self.encode_torch(
            torch.from_numpy(np.asarray(keypoints, dtype=np.float64)),
            torch.from_numpy(np.asarray(visibility, dtype=np.float32)),
        )
        return {name: value.numpy() for name, value in targets.items()}, weights.numpy()

    @abstractmethod
    def encode_torch(
        self, keypoints: torch.Tensor, visibility: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Targets and float32 weights for keypoints ``(..., K, 2)`` in input px, on their device.

        ``visibility`` is ``(..., K)``; targets are ``(..., K, h, w)`` float32 maps
        (offsets ``(..., K, 2, h, w)``) and weights ``(..., K)``. The trainer calls
        this on the training device for a whole batch (``cal_core.data.dataset.add_targets``):
        building targets there costs microseconds on a GPU instead of megabytes of
        per-batch CPU work in the loader.
        """

    @abstractmethod
    def decode(self, heatmap: torch.Tensor, offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched torch decode: ``(N, K, h, w)`` (+ offsets) -> keypoints ``(N, K, 2)`` input px, scores ``(N, K)``."""

    @abstractmethod
    def decode_numpy(self, heatmap: np.ndarray, offset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Reference decode in numpy with the same contract as :meth:`decode`."""

    def peak_map(self, heatmap: torch.Tensor) -> torch.Tensor:
        """The map :meth:`decode` takes its argmax and scores from: the heatmap, unless a codec transforms it."""
        return heatmap

    def _check_heatmap(self, heatmap: torch.Tensor | np.ndarray) -> None:
        if heatmap.ndim != 4 or tuple(heatmap.shape[2:]) != self.heatmap_size:
            raise ValueError(
                f"{self.name} decode needs heatmaps (N, K, {self.heatmap_size[0]}, {self.heatmap_size[1]}), "
                f"got {tuple(heatmap.shape)}"
            )


def argmax_torch(heatmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat argmax per map (ONNX-friendly: flatten + argmax + gather).

    Returns the flat index ``(N, K)`` int64, the integer pixel ``(N, K, 2)`` as
    float (x, y) and the maximum value ``(N, K)`` (the keypoint score).
    """
    n, k, _, w = heatmap.shape
    flat = heatmap.reshape(n, k, -1)
    index = flat.argmax(dim=-1)
    score = flat.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    x = torch.remainder(index, w)
    y = torch.div(index, w, rounding_mode="floor")
    return index, torch.stack([x, y], dim=-1).to(heatmap.dtype), score


def argmax_numpy(heatmap: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numpy reference of :func:`argmax_torch`: flat index, pixel ``(x, y)`` and max value."""
    n, k, h, w = heatmap.shape
    index = heatmap.reshape(n, k, -1).argmax(axis=-1)
    ys, xs = np.unravel_index(index, (h, w))
    score = np.take_along_axis(heatmap.reshape(n, k, -1), index[..., None], axis=-1)[..., 0]
    return index, np.stack([xs, ys], axis=-1).astype(np.float64), score
