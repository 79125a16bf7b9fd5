"""HRNet backbones (Sun et al., CVPR 2019) from timm, adapted to pose at any input size.

timm builds the ImageNet HRNet; the pose HRNet the paper uses (Table 1) differs
in two ways, both fixed here so the parameter counts match for the right reason:

1. **Any input size.** timm's fuse layers upsample lower branches with fixed
   ``scale_factor=2**k``; at 64x48 the stride-32 branch is 2x2 (ceil of 1.5),
   so x8 gives 16x16 against a 16x12 stride-4 branch and the sum fails. Every
   :class:`timm.models.hrnet.HighResolutionModule` is switched to
   :class:`SizedFuseModule`, which upsamples (nearest, as before) to the exact
   size of the branch it fuses into. Where sizes are multiples of 32 the result
   is identical to timm's; the size comes from a tensor shape, so ONNX export works.
2. **Single-resolution output.** The pose net's last module fuses only into the
   stride-4 branch (``multi_scale_output=False``); timm's classifier keeps all
   four. The unused fuse layers (0.77M for W32) are dropped, and timm's
   classification head is never built (``features_only``).

The net is split into ``shared`` (stem to stage 3) and ``trunk`` (transition3 +
stage 4, the part the CAL ``dual`` layout duplicates). Submodule names are
timm's, so an ImageNet HRNet state dict maps onto them by name.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.models.hrnet import HighResolutionModule
from torch import nn

#: cal-pose backbone name -> timm model name.
TIMM_NAMES: dict[str, str] = {
    "hrnet_w18_small": "hrnet_w18_small_v2",
    "hrnet_w32": "hrnet_w32",
    "hrnet_w48": "hrnet_w48",
}

SHARED_PARTS = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "layer1",
                "transition1", "stage2", "transition2", "stage3")
TRUNK_PARTS = ("transition3", "stage4")


class SizedFuseModule(HighResolutionModule):
    """A timm HRNet module whose fuse step resizes each upsampled branch to its target's size.

    Same parameters and state-dict keys as the timm module (its ``nn.Upsample``
    layers are replaced by parameter-free identities); forward does not modify
    its input list, so two trunks can read the same stage-3 outputs.
    """

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        x = [branch(t) for branch, t in zip(self.branches, x, strict=True)]
        fused = []
        for i, fuse_outer in enumerate(self.fuse_layers):
            y = x[i]
            for j, f in enumerate(fuse_outer):
                if j < i:
                    y = y + f(x[j])
                elif j > i:
                    y = y + F.interpolate(f(x[j]), size=x[i].shape[-2:], mode="nearest")
            fused.append(self.fuse_act(y))
        return fused


def _make_sized(model: nn.Module) -> None:
    """Switch every HRNet module of ``model`` to :class:`SizedFuseModule` in place."""
    for module in model.modules():
        if isinstance(module, HighResolutionModule):
            module.__class__ = SizedFuseModule
            if isinstance(module.fuse_layers, nn.ModuleList):
                for fuse_outer in module.fuse_layers:
                    for f in fuse_outer:
                        if isinstance(f, nn.Sequential) and isinstance(f[-1], nn.Upsample):
                            f[-1] = nn.Identity()


def _single_output(stage: nn.Sequential) -> None:
    """Keep only the fuse into the stride-4 branch in the stage's last module (pose HRNet)."""
    last = stage[-1]
    last.fuse_layers = last.fuse_layers[:1]
    last.multi_scale_output = False


class HRNetShared(nn.Module):
    """Stem (two stride-2 3x3 convs), layer1 and stages 2-3: image -> list of 3 branches."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        for name in SHARED_PARTS:
            setattr(self, name, getattr(body, name))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer1(self.act2(self.bn2(self.conv2(x))))
        xl = [t(x) for t in self.transition1]
        yl = self.stage2(xl)
        xl = [yl[i] if isinstance(t, nn.Identity) else t(yl[-1]) for i, t in enumerate(self.transition2)]
        return self.stage3(xl)


class HRNetTrunk(nn.Module):
    """Transition3 and stage 4: stage-3 branches -> stride-4 features."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        for name in TRUNK_PARTS:
            setattr(self, name, getattr(body, name))

    def forward(self, yl: list[torch.Tensor]) -> torch.Tensor:
        xl = [yl[i] if isinstance(t, nn.Identity) else t(yl[-1]) for i, t in enumerate(self.transition3)]
        return self.stage4(xl)[0]


def build_hrnet(name: str) -> tuple[HRNetShared, HRNetTrunk, int]:
    """``(shared, trunk, channels)`` for a cal-pose HRNet name (randomly initialised, never downloaded)."""
    if name not in TIMM_NAMES:
        raise ValueError(f"unknown HRNet {name!r}; choose one of {tuple(TIMM_NAMES)}")
    body = timm.create_model(TIMM_NAMES[name], pretrained=False, features_only=True,
                             feature_location="", out_indices=(1,))
    _make_sized(body)
    _single_output(body.stage4)
    channels = body.feature_info.channels()[0]
    return HRNetShared(body), HRNetTrunk(body), channels
