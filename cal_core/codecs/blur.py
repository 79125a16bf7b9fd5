"""Separable Gaussian blur of ``(N, K, h, w)`` heatmaps with OpenCV's default taps, in torch and numpy.

Decoders smooth the network's heatmap before reading it: DARK (Zhang et
al. 2020) before its Taylor step, UDP (Huang et al. 2020) before its argmax.
The taps are those of ``cv2.GaussianBlur(map, (k, k), 0)``, the call both
reference implementations make, so a kernel size means the same here. The
torch version is traceable (ONNX: Pad + grouped Conv); the numpy version is
the reference the tests hold it to.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Border modes: "zero" (a zero-bordered map, as DARK pads) or "edge" (replicated edge pixels).
BORDERS = ("zero", "edge")
#: OpenCV's fixed taps for small kernels given sigma 0 (``getGaussianKernel``'s ``small_gaussian_tab``).
_OPENCV_SMALL_TAPS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    3: (0.25, 0.5, 0.25),
    5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
    7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125),
}


def blur_kernel_1d(kernel: int) -> np.ndarray:
    """Normalised 1-D Gaussian taps of length ``kernel``, as ``cv2.getGaussianKernel(kernel, 0)``.

    OpenCV uses fixed taps up to 7 and otherwise samples a Gaussian of sigma
    ``0.3 * ((kernel - 1) / 2 - 1) + 0.8``.
    """
    if kernel in _OPENCV_SMALL_TAPS:
        return np.array(_OPENCV_SMALL_TAPS[kernel])
    taps = np.arange(kernel) - (kernel - 1) / 2
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    g = np.exp(-(taps**2) / (2 * sigma**2))
    return g / g.sum()


def blur_torch(heatmap: torch.Tensor, kernel: int, border: str) -> torch.Tensor:
    """``kernel`` x ``kernel`` Gaussian blur of ``(N, K, h, w)`` maps, float32, same size."""
    _check(kernel, border)
    k, pad = heatmap.shape[1], kernel // 2
    taps = blur_kernel_1d(kernel)
    weight = torch.as_tensor(np.tile(np.outer(taps, taps), (k, 1, 1, 1)), dtype=torch.float32,
                             device=heatmap.device)
    maps = heatmap.float()
    if border == "edge":
        return F.conv2d(F.pad(maps, (pad, pad, pad, pad), mode="replicate"), weight, groups=k)
    return F.conv2d(maps, weight, padding=pad, groups=k)


def blur_numpy(heatmap: np.ndarray, kernel: int, border: str) -> np.ndarray:
    """Numpy reference of :func:`blur_torch` (explicit sliding windows), float64."""
    _check(kernel, border)
    g, pad = blur_kernel_1d(kernel), kernel // 2
    mode = "edge" if border == "edge" else "constant"
    padded = np.pad(np.asarray(heatmap, dtype=np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode=mode)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel, kernel), axis=(2, 3))
    return np.einsum("nkhwij,i,j->nkhw", windows, g, g)


def _check(kernel: int, border: str) -> None:
    if kernel < 1 or kernel % 2 == 0 or border not in BORDERS:
        raise ValueError(f"blur needs an odd kernel >= 1 and a border in {BORDERS}, got {kernel}, {border!r}")
