"""UDP offset codec (Huang et al., CVPR 2020; paper Sec. 3.2): binary disk + offset fields.

Targets per joint ``y`` (heatmap pixels) and heatmap pixel ``p``:
- Eq. 6, the disk ``B(p) = 1 if |p - y| <= R else 0``;
- Eq. 7, the offsets ``O(p) = (y - p) / offset_norm`` inside the disk, 0 outside
  (x then y), normalised so the regression targets are O(1).
Decoding is Eq. 9: ``y_hat = argmax_p B_hat + offset_norm * O_hat(argmax_p B_hat)``,
exact for ground-truth targets because any disk pixel points at ``y``. UDP's
own decoder (UDP-Pose's ``get_final_preds``, mmpose's ``UDPHeatmap``) first
blurs the predicted disk: a network trained on a flat disk predicts a
plateau, whose raw argmax lands anywhere in it, while the blurred plateau
peaks at its centre, where the offsets are most accurate. The ``udp`` codec
does the same (``blur_kernel``, see :data:`UDP_DEFAULTS`, on the sigmoid
probabilities, scores read from the blurred map) with an edge-replicated
border, where UDP-Pose and mmpose call ``cv2.GaussianBlur`` with OpenCV's
default reflect-101 border; CAL keeps Eq. 9's plain argmax, as its
paper specifies (its Gaussian-weighted target already peaks at the joint).
UDP-Pose also blurs the offsets (7x7); mmpose does not, nor do we.

The UDP network is trained with Eq. 8's cross-entropy on B, so its heatmap output
is a logit map (``cal_core.losses``); the keypoint score is therefore the sigmoid
of the logit at the argmax, a probability in 0..1 like the other methods' scores
(COCO rescoring averages keypoint scores above a 0.2 threshold). CAL regresses
G with L2 (Eq. 14), so its heatmap is already a confidence and is not squashed.

Defaults (heatmap pixels) follow the CAL authors' configs (``KPD: 4.0`` disk radius,
``LOCREF_STDEV: 1.5`` offset normalisation, at 64x48 and 128x96); their 256x192
config publishes no CAL offset settings, so the same R = 4 and 1.5 are kept.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from cal_core.codecs.base import Codec, CodecSettings, argmax_numpy, argmax_torch
from cal_core.codecs.blur import blur_numpy, blur_torch


class UdpCodec(Codec):
    """Binary disk heatmap (Eq. 6) + normalised offsets (Eq. 7); decode Eq. 9."""

    name: ClassVar[str] = "udp"
    has_offsets: ClassVar[bool] = True
    #: The heatmap output is a logit map (Eq. 8 cross-entropy): scores are its sigmoid.
    logit_heatmap: ClassVar[bool] = True
    #: Blur the heatmap (``blur_kernel``) before the argmax, as UDP's own decoder does.
    blur_heatmap: ClassVar[bool] = True

    def heatmap_target(self, disk: torch.Tensor, joints_hm: torch.Tensor) -> torch.Tensor:
        """The heatmap the network learns: UDP uses the disk B itself (Eq. 6), as float32."""
        return disk.float()

    def encode_torch(
        self, keypoints: torch.Tensor, visibility: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``{"heatmap" (..., K, h, w), "offset" (..., K, 2, h, w)}`` and ``(..., K)`` weights.

        The disk B of Eq. 6 and the offsets of Eq. 7 are zero for unweighted joints.
        """
        joints_hm, weights = self.prepare(keypoints, visibility)
        dx, dy = self.axis_distances(joints_hm)
        disk = (dy * dy)[..., :, None] + (dx * dx)[..., None, :] <= self.radius**2
        scale = -1.0 / self.offset_norm  # O = (y - p) / norm = -(p - y) / norm
        offset = torch.stack([disk * (dx * scale)[..., None, :], disk * (dy * scale)[..., :, None]], dim=-3)
        return {"heatmap": self.heatmap_target(disk, joints_hm), "offset": offset}, weights

    def decode(self, heatmap: torch.Tensor, offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 9 on ``(N, K, h, w)`` heatmaps and ``(N, K, 2, h, w)`` normalised offsets."""
        self._check_heatmap(heatmap)
        self._check_offset(heatmap, offset)
        n, k, h, w = heatmap.shape
        index, xy, score = argmax_torch(self.peak_map(heatmap))
        picked = offset.reshape(n, k, 2, h * w).gather(-1, index[:, :, None, None].expand(n, k, 2, 1))
        stride = torch.as_tensor(self.stride, dtype=heatmap.dtype, device=heatmap.device)
        return (xy + picked.squeeze(-1) * self.offset_norm) * stride, score

    def peak_map(self, heatmap: torch.Tensor) -> torch.Tensor:
        """The sigmoid of udp's logits, blurred where the decoder blurs: the map Eq. 9's argmax reads."""
        confidence = torch.sigmoid(heatmap) if self.logit_heatmap else heatmap
        if self.blur_heatmap and self.settings.blur_kernel > 1:
            confidence = blur_torch(confidence, self.settings.blur_kernel, "edge").to(heatmap.dtype)
        return confidence

    def decode_numpy(self, heatmap: np.ndarray, offset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Numpy reference of :meth:`decode`."""
        heatmap = np.asarray(heatmap, dtype=np.float64)
        self._check_heatmap(heatmap)
        self._check_offset(heatmap, offset)
        confidence = 1.0 / (1.0 + np.exp(-heatmap)) if self.logit_heatmap else heatmap
        if self.blur_heatmap and self.settings.blur_kernel > 1:
            confidence = blur_numpy(confidence, self.settings.blur_kernel, "edge")
        _, xy, score = argmax_numpy(confidence)
        nn, kk = np.meshgrid(np.arange(heatmap.shape[0]), np.arange(heatmap.shape[1]), indexing="ij")
        picked = np.asarray(offset, dtype=np.float64)[nn, kk, :, xy[..., 1].astype(int), xy[..., 0].astype(int)]
        return (xy + picked * self.offset_norm) * self.stride, score

    def _check_offset(self, heatmap: torch.Tensor | np.ndarray, offset: torch.Tensor | np.ndarray | None) -> None:
        expected = (heatmap.shape[0], heatmap.shape[1], 2, *self.heatmap_size)
        if offset is None or tuple(offset.shape) != expected:
            got = None if offset is None else tuple(offset.shape)
            raise ValueError(f"{self.name} decode needs offsets of shape {expected}, got {got}")


#: Per input size (H, W); sigma is unused by UDP and kept equal to CAL's for a like-for-like config. The
#: decode blur: UDP-Pose's 15 x 15 for its R = 4 disk on a 64x48 heatmap (256x192 input); on the smaller
#: maps, where the same disk covers up to a quarter of the map, 7 (of 3-15, the best at finding a noisy
#: predicted disk's centre at 64x48 and 128x96: test_blurred_argmax_finds_the_centre_of_a_predicted_plateau).
UDP_DEFAULTS: dict[tuple[int, int], CodecSettings] = {
    (64, 48): CodecSettings(sigma=0.3, radius=4.0, offset_norm=1.5, blur_kernel=7),
    (128, 96): CodecSettings(sigma=1.0, radius=4.0, offset_norm=1.5, blur_kernel=7),
    (256, 192): CodecSettings(sigma=2.0, radius=4.0, offset_norm=1.5, blur_kernel=15),
}
