"""Target codecs, one module per method (DESIGN.md §4): heatmap, dark, udp, cal.

``build_codec(name, input_size, **settings)`` returns a codec with the
per-resolution defaults of that method, any keyword overriding one setting
(``sigma``, ``radius``, ``offset_norm``, ``blur_kernel``, ``quarter_shift``).
"""

from __future__ import annotations

from dataclasses import fields, replace

from cal_core.codecs.base import Codec, CodecSettings
from cal_core.codecs.cal import CAL_DEFAULTS, CalCodec
from cal_core.codecs.dark import DarkCodec
from cal_core.codecs.heatmap import HEATMAP_DEFAULTS, HeatmapCodec
from cal_core.codecs.udp import UDP_DEFAULTS, UdpCodec

CODECS: tuple[str, ...] = ("heatmap", "dark", "udp", "cal")

_CLASSES: dict[str, type[Codec]] = {"heatmap": HeatmapCodec, "dark": DarkCodec, "udp": UdpCodec, "cal": CalCodec}
_DEFAULTS: dict[str, dict[tuple[int, int], CodecSettings]] = {
    "heatmap": HEATMAP_DEFAULTS, "dark": HEATMAP_DEFAULTS, "udp": UDP_DEFAULTS, "cal": CAL_DEFAULTS,
}  # fmt: skip


def parse_size(size: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``"64x48"`` or ``(64, 48)`` -> ``(64, 48)`` (height, width)."""
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"input size must look like '64x48' (height x width), got {size!r}")
        return int(parts[0]), int(parts[1])
    height, width = (int(v) for v in size)
    return height, width


def default_settings(name: str, input_size: str | tuple[int, int]) -> CodecSettings:
    """The method's settings for ``input_size``; other sizes take the nearest tabulated size's (by height)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown codec {name!r}; choose one of {CODECS}")
    size = parse_size(input_size)
    table = _DEFAULTS[name]
    if size in table:
        return table[size]
    nearest = min(table, key=lambda known: abs(known[0] - size[0]))
    return table[nearest]


def build_codec(name: str, input_size: str | tuple[int, int], **settings: object) -> Codec:
    """A ``name`` codec for ``input_size`` (H, W); keyword settings override the defaults (None = default)."""
    allowed = {f.name for f in fields(CodecSettings)}
    unknown = set(settings) - allowed
    if unknown:
        raise ValueError(f"unknown codec settings {sorted(unknown)}; allowed: {sorted(allowed)}")
    base = default_settings(name, input_size)
    overrides = {key: value for key, value in settings.items() if value is not None}
    return _CLASSES[name](parse_size(input_size), replace(base, **overrides))


__all__ = ["CODECS", "Codec", "CodecSettings", "build_codec", "default_settings", "parse_size"]
