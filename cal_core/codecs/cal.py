"""CAL codec (paper Sec. 4.1): Gaussian-weighted binary heatmap G = B * C (Eq. 10) + UDP offsets.

G is scaled to a sampled peak of 1 (:meth:`CalCodec.heatmap_target` says why).

The disk ``B`` of Eq. 6 is weighted by the Gaussian ``C`` of Eq. 2 so pixels
nearer the joint carry more confidence and the argmax of the prediction is
trained to sit on the joint, the pixel whose offset Eq. 9 reads at test time.
Offsets (Eq. 7), their normalisation and the decode (Eq. 9) are UDP's.

Defaults from the authors' configs (heatmap pixels): ``SIGMA`` 0.3 at 64x48,
1.0 at 128x96 and 2 at 256x192; disk radius ``KPD`` 4.0; offsets divided by
``LOCREF_STDEV`` 1.5.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from cal_core.codecs.base import CodecSettings
from cal_core.codecs.udp import UdpCodec


class CalCodec(UdpCodec):
    """Heatmap target G = B * C (Eq. 10) with UDP offsets and the Eq. 9 decode."""

    name: ClassVar[str] = "cal"
    #: CAL regresses G with L2 (Eq. 14): the heatmap value itself is the confidence.
    logit_heatmap: ClassVar[bool] = False
    #: Eq. 9: the plain argmax of G (its Gaussian weighting already peaks at the joint).
    blur_heatmap: ClassVar[bool] = False

    def heatmap_target(self, disk: torch.Tensor, joints_hm: torch.Tensor) -> torch.Tensor:
        """Eq. 10: ``G(p) = B(p) * C(p)``, scaled so its largest sampled value is 1.

        ``C`` is centred on the exact sub-pixel joint (Eq. 2), so on the pixel
        grid its peak is ``exp(-d^2 / 2 sigma^2)``, ``d`` the distance to the
        nearest pixel: with the authors' sigma 0.3 at 64x48 anything from 0.06
        (a joint on a pixel corner) to 1. The target's peak would then encode
        the joint's sub-pixel phase instead of confidence: a perfect network's
        keypoint scores would fall below the 0.2 rescoring threshold for ~13%
        of joints, and the stage-1 offset weight (G, Eq. 14) would all but
        vanish for corner joints. Dividing by the sampled peak keeps G's shape
        and makes the nearest pixel 1, as the authors' targets (a Gaussian on
        the nearest pixel) have it; at sigma 1 and 2 it scales by < 1.28x.
        """
        target = self.gaussian(joints_hm)
        target *= disk
        peak = target.amax(dim=(-2, -1), keepdim=True)
        return torch.where(peak > 0, target / peak.clamp_min(1e-30), target)


CAL_DEFAULTS: dict[tuple[int, int], CodecSettings] = {
    (64, 48): CodecSettings(sigma=0.3, radius=4.0, offset_norm=1.5),
    (128, 96): CodecSettings(sigma=1.0, radius=4.0, offset_norm=1.5),
    (256, 192): CodecSettings(sigma=2.0, radius=4.0, offset_norm=1.5),
}
