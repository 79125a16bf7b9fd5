"""Backbones, each split into ``shared`` (image -> intermediate) and ``trunk`` (-> stride-4 features).

The ``trunk`` is the part the CAL ``dual`` head builds twice (heads.py). Names:

- ``hrnet_w18_small``, ``hrnet_w32``, ``hrnet_w48``: timm HRNets (hrnet.py);
  trunk = transition3 + stage 4, as in the authors' CAL HRNet.
- ``resnet50``: SimpleBaseline (Xiao et al., ECCV 2018): torchvision ResNet-50
  to stride 32, then three 4x4 stride-2 deconvolutions with 256 channels; trunk
  = the deconvolution stack.
- ``tiny``: a small CPU net for tests, CPU benchmarks and the CPU accuracy
  comparison (:class:`TinyShared`); trunk = one residual block at stride 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cal_core.models.heads import ResidualBlock, init_weights
from cal_core.models.hrnet import TIMM_NAMES, build_hrnet

BACKBONES: tuple[str, ...] = ("tiny", *TIMM_NAMES, "resnet50")
#: Channels of the tiny net at strides 4, 8 and 16.
TINY_WIDTHS = (24, 48, 96)


def conv_bn_relu(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyShared(nn.Module):
    """A small U-shaped encoder-decoder that ends at stride 4 (about 0.5M parameters).

    A stride-4 stem feeds three resolutions (strides 4, 8, 16 with 24, 48, 96
    channels); the decoder adds the coarser, context-rich features back into the
    finer ones (1x1 lateral conv + nearest resize to the finer map's exact size,
    so any input size works), as HRNet's fuse layers do, keeping the stride-4
    resolution the heatmaps need. Sized for CPU training: about 15M
    multiply-adds per 64x48 image with the ``offset`` head, about half of it at
    strides 8-16 where context is cheap.
    """

    def __init__(self, widths: tuple[int, int, int] = TINY_WIDTHS) -> None:
        super().__init__()
        c4, c8, c16 = widths
        self.stem = nn.Sequential(conv_bn_relu(3, 16, 2), conv_bn_relu(16, c4, 2))
        self.enc4 = ResidualBlock(c4)
        self.enc8 = nn.Sequential(conv_bn_relu(c4, c8, 2), ResidualBlock(c8))
        self.enc16 = nn.Sequential(conv_bn_relu(c8, c16, 2), ResidualBlock(c16), ResidualBlock(c16))
        self.lat16 = nn.Sequential(nn.Conv2d(c16, c8, 1, bias=False), nn.BatchNorm2d(c8))
        self.dec8 = ResidualBlock(c8)
        self.lat8 = nn.Sequential(nn.Conv2d(c8, c4, 1, bias=False), nn.BatchNorm2d(c4))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f4 = self.enc4(self.stem(x))
        f8 = self.enc8(f4)
        f16 = self.enc16(f8)
        f8 = self.dec8(f8 + F.interpolate(self.lat16(f16), size=f8.shape[-2:], mode="nearest"))
        return F.relu(f4 + F.interpolate(self.lat8(f8), size=f4.shape[-2:], mode="nearest"))


def build_tiny() -> tuple[nn.Module, nn.Module, int]:
    """``(shared, trunk, channels)`` of the tiny CPU net."""
    trunk = nn.Sequential(ResidualBlock(TINY_WIDTHS[0]))
    init_weights(trunk)
    return TinyShared(), trunk, TINY_WIDTHS[0]


class ResNetShared(nn.Module):
    """torchvision ResNet-50 without pooling/fc: image -> (stride-32 features, finer sizes).

    The sizes of the stride-16, -8 and -4 maps go along so the deconvolutions
    can crop to them: at 64x48 the stride-32 map is 2x2 (ceil of 1.5) and a
    plain x8 upsampling would give 16x16 instead of 16x12.
    """

    def __init__(self) -> None:
        super().__init__()
        net = torchvision.models.resnet50(weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        c2 = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        sizes = [tuple(t.shape[-2:]) for t in (c4, c3, c2)]
        return self.layer4(c4), sizes


class DeconvTrunk(nn.Module):
    """SimpleBaseline's head: three (4x4 stride-2 deconv, BN, ReLU) with 256 channels, stride 32 -> 4.

    Each x2 output is cropped to the size of the encoder map at that stride
    (top-left, the same corner the stride-2 convolutions anchor), which is a
    no-op when the input is a multiple of 32.
    """

    def __init__(self, in_channels: int = 2048, channels: int = 256, layers: int = 3) -> None:
        super().__init__()
        self.ups = nn.ModuleList()
        for i in range(layers):
            self.ups.append(nn.Sequential(
                nn.ConvTranspose2d(in_channels if i == 0 else channels, channels, 4, 2, 1, bias=False),
                nn.BatchNorm2d(channels), nn.ReLU(inplace=True)))
        init_weights(self)

    def forward(self, feats: tuple[torch.Tensor, list[tuple[int, int]]]) -> torch.Tensor:
        x, sizes = feats
        for up, (h, w) in zip(self.ups, sizes, strict=True):
            x = up(x)[..., :h, :w]
        return x


def build_backbone(name: str) -> tuple[nn.Module, nn.Module, int]:
    """``(shared, trunk, channels)`` for one of :data:`BACKBONES`, randomly initialised."""
    if name == "tiny":
        return build_tiny()
    if name == "resnet50":
        return ResNetShared(), DeconvTrunk(), 256
    if name in TIMM_NAMES:
        return build_hrnet(name)
    raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
