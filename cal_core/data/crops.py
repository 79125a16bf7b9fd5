"""Anti-aliased low-resolution person crops: reduced-size JPEG decode, integer pre-reduction, affine warp.

Downscaling with a plain bilinear ``warpAffine`` (what most pose code does)
samples 4 source pixels per output pixel whatever the scale, so a person
shrunk 8x is aliased: thin limbs break up and edges shimmer. A faithful low
resolution image averages every source pixel it covers. We get that cheaply
in three steps, all as exact affines in the UDP pixel-centre convention:

1. **Decode at reduced size** (libjpeg-turbo DCT scaling, through
   ``simplejpeg``) by the largest factor ``d`` in {1, 2, 4, 8}
   that is not coarser than any crop of the image needs. DCT scaling is an
   area-like low-pass and cheaper than a full decode. Output pixel ``a``
   covers source pixels ``[d a, d a + d)``, so its centre is
   ``d a + (d - 1) / 2`` in source pixels.
2. **Box-reduce** only the crop's region by the integer ``k = floor(step / d)``
   (``cv2.resize`` ``INTER_AREA`` by an integer factor, an exact box average;
   blocks past the image edge average in black), leaving a residual
   downscale in ``[1, 2)``, where bilinear interpolation no longer aliases
   noticeably.
3. **Warp** that region to the crop with bilinear interpolation (OpenCV),
   through the composed affine, pixels outside the image black (as HRNet).

Pixels stay in OpenCV's BGR order from decode to JPEG encode: no channel
swaps or copies on the way (the stored JPEG is the same either way).

Keypoints never go through steps 1-2: they are mapped with the exact
image -> crop affine, so they stay exact whatever the pixel path.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from cal_core.geometry import box_to_center_size, compose_affine, invert_affine, warp_matrix

#: Library errors that mean "these bytes are not a decodable image".
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError)


class ImageDecodeError(ValueError):
    """The bytes are not a complete, decodable image (truncated, corrupt or not an image)."""


class ImageTooLargeError(ImageDecodeError):
    """A valid image with more pixels than the decompression-bomb guard allows (``max_pixels``)."""


#: Default decompression-bomb guard: PIL's own error threshold (twice its 89,478,485-pixel warning limit),
#: ~179 megapixels. A JPEG that large decodes at 1/8 in ~3 MB, so gigapixel frames may raise it (0: none).
DEFAULT_MAX_PIXELS = 2 * 89_478_485


#: libjpeg-turbo DCT scaling factors (original size / decoded size) we decode at.
_DCT_SCALES = (8, 4, 2, 1)


@dataclass(frozen=True)
class Decoded:
    """A ``(h, w, 3)`` uint8 BGR image decoded at ``1 / scale`` of its ``size`` (original ``(W, H)``)."""

    pixels: np.ndarray
    scale: int
    size: tuple[int, int]


def crop_size(input_size: tuple[int, int], margin: float) -> tuple[int, int]:
    """``(H, W)`` of the stored crop: ``margin x input_size``, rounded half up."""
    return tuple(int(math.floor(margin * side + 0.5)) for side in input_size)  # type: ignore[return-value]


def crop_matrix(bbox: tuple[float, float, float, float], input_size: tuple[int, int], margin: float,
                padding: float) -> np.ndarray:
    """``(2, 3)`` affine, image pixels -> crop pixels, for a person box.

    The padded box (``box_to_center_size`` with the input's aspect) is the
    central ``1 / margin`` of the crop: the crop covers ``margin`` times the
    padded box and is ``crop_size(input_size, margin)`` pixels (UDP scale).
    """
    height, width = input_size
    center, size = box_to_center_size(bbox, width / height, padding)
    crop_h, crop_w = crop_size(input_size, margin)
    return warp_matrix(center, size * margin, 0.0, (crop_w, crop_h))


def source_step(matrix: np.ndarray) -> float:
    """Source pixels per crop pixel along the finer axis of an image -> crop affine."""
    (a, b, _), (c, d, _) = np.asarray(matrix, dtype=np.float64).tolist()
    return 1.0 / max(math.hypot(a, b), math.hypot(c, d))


def decode(data: bytes, min_step: float, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode image bytes to BGR, JPEGs reduced by the largest DCT factor not above ``min_step``.

    JPEGs go through ``simplejpeg`` (libjpeg-turbo's TurboJPEG API, EXIF
    orientation ignored as annotations use the stored pixels): it reads the
    header and decodes with less per-call work than OpenCV's ``imdecode``
    (format probing, buffer copies) or PIL (measured on coco-mini: ~15% less
    decode CPU, the same pixels). Anything it cannot decode (other formats,
    CMYK, 12-bit, a JPEG libjpeg only warns about) goes to PIL at full size,
    which decodes it or says what is wrong: :class:`ImageDecodeError`.
    Grayscale, CMYK, palette and alpha images become 3-channel colour.
    An image of more than ``max_pixels`` pixels (0: no limit) is refused
    before decoding, as a decompression-bomb guard: :class:`ImageTooLargeError`.
    """
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        colorspace = None  # not a JPEG libjpeg-turbo can parse
    if colorspace in ("YCbCr", "Gray"):
        _check_pixels((width, height), max_pixels)
        scale = max(s for s in _DCT_SCALES if s <= max(1.0, min_step))
        pixels = _turbo_decode(data, (height, width), scale)
        if pixels is not None:
            return Decoded(pixels, scale, (width, height))
    return _pil_decode(data, max_pixels)


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """:class:`ImageTooLargeError` if a ``(W, H)`` image has more than ``max_pixels`` pixels (0: no limit)."""
    if max_pixels and size[0] * size[1] > max_pixels:
        raise ImageTooLargeError(f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels is over the decompression-"
                                 f"bomb guard of {max_pixels:,} (--max-image-pixels; 0 turns it off)")


def _turbo_decode(data: bytes, size_hw: tuple[int, int], scale: int) -> np.ndarray | None:
    """BGR pixels at ``1 / scale`` (libjpeg's ``ceil`` size), or None if libjpeg-turbo fails or warns.

    The size is checked because the crop geometry relies on the exact DCT
    factor (``min_factor`` and the minimum size pin it; a library that
    picked another would otherwise shift every crop silently).
    """
    expected = (-(-size_hw[0] // scale), -(-size_hw[1] // scale))
    try:
        pixels = simplejpeg.decode_jpeg(data, "BGR", min_factor=scale, min_height=expected[0],
                                        min_width=expected[1])
    except ValueError:
        return None  # truncated, corrupt, or a warning PIL tolerates: PIL decides
    return pixels if pixels.shape[:2] == expected else None


def _pil_decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Full-size BGR pixels of any image PIL reads; :class:`ImageDecodeError` with PIL's reason if broken.

    ``max_pixels`` replaces PIL's own decompression-bomb limit (its global
    ``Image.MAX_IMAGE_PIXELS`` is lifted while the header is read).
    """
    try:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        _check_pixels(image.size, max_pixels)
        if image.mode.startswith("I;16"):
            return Decoded(_gray16_to_bgr(np.asarray(image)), 1, image.size)
        if image.mode in ("I", "F"):  # 32-bit integer or float samples: no defined 8-bit range
            raise ImageDecodeError(f"unsupported pixel format: PIL mode {image.mode!r} (32-bit samples)")
        rgb = np.asarray(image.convert("RGB"))
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError as exc:  # PIL's message names only its BytesIO object
        what = "an empty file" if not data else f"{len(data)} bytes starting {data[:8]!r}"
        raise ImageDecodeError(f"not an image format PIL knows: {what}") from exc
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"{type(exc).__name__}: {exc}") from exc
    return Decoded(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), 1, image.size)


def _gray16_to_bgr(gray: np.ndarray) -> np.ndarray:
    """16-bit grayscale as 8-bit BGR, the high byte (as OpenCV reads 16-bit images).

    PIL's ``convert("RGB")`` clips 16-bit values at 255 instead: nearly white.
    """
    high = (gray.astype(np.uint16) >> 8).astype(np.uint8)
    return np.repeat(high[..., None], 3, axis=2)


def render(decoded: Decoded, matrix: np.ndarray, crop_wh: tuple[int, int]) -> np.ndarray:
    """The crop ``(H, W, 3)`` uint8 BGR for the image -> crop affine ``matrix``, anti-aliased.

    Only the region the crop covers (plus one reduced pixel for the bilinear
    support) is box-reduced, then warped through ``matrix`` composed with the
    region -> image affine. Without reduction (``k == 1``) the warp reads the
    decoded image directly.
    """
    d = decoded.scale
    k = max(1, int(math.floor(source_step(matrix) / d + 1e-9)))
    left, top, region = 0, 0, decoded.pixels
    if k > 1:
        left, top, right, bottom = _region(decoded, matrix, crop_wh, k)
        region = _box_reduce(decoded.pixels, (left, top, right, bottom), k)
    # region px b -> decoded px a = box0 + k b + (k - 1) / 2 -> source px d a + (d - 1) / 2
    to_image = np.array([[d * k, 0.0, d * (left + (k - 1) / 2.0) + (d - 1) / 2.0],
                         [0.0, d * k, d * (top + (k - 1) / 2.0) + (d - 1) / 2.0]])
    total = compose_affine(matrix, to_image)
    return cv2.warpAffine(region, total, crop_wh, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def _region(decoded: Decoded, matrix: np.ndarray, crop_wh: tuple[int, int], k: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` in decoded pixels that the crop reads, with a margin of ``k + 1``.

    Clamped to the image, so reduction blocks start at an image pixel.
    """
    d = decoded.scale
    (a, b, tx), (c, e, ty) = invert_affine(matrix).tolist()  # crop px -> source px
    xs, ys = (-0.5, crop_wh[0] - 0.5), (-0.5, crop_wh[1] - 0.5)
    src_x = [a * x + b * y + tx for x in xs for y in ys]
    src_y = [c * x + e * y + ty for x in xs for y in ys]
    pad = k + 1  # one reduced pixel of bilinear support, plus rounding
    height, width = decoded.pixels.shape[:2]
    left = min(max(math.floor((min(src_x) - (d - 1) / 2.0) / d) - pad, 0), width - 1)
    top = min(max(math.floor((min(src_y) - (d - 1) / 2.0) / d) - pad, 0), height - 1)
    right = max(math.ceil((max(src_x) - (d - 1) / 2.0) / d) + pad + 1, left + 1)
    bottom = max(math.ceil((max(src_y) - (d - 1) / 2.0) / d) + pad + 1, top + 1)
    return left, top, min(right, width), min(bottom, height)


def _box_reduce(pixels: np.ndarray, box: tuple[int, int, int, int], k: int) -> np.ndarray:
    """Exact ``k x k`` box average of ``pixels[top:bottom, left:right]``, the last blocks padded with black.

    The box is grown to whole blocks; ``INTER_AREA`` by an integer factor is
    OpenCV's exact (and for ``k == 2`` vectorised) block mean.
    """
    left, top, right, bottom = box
    width, height = -(-(right - left) // k) * k, -(-(bottom - top) // k) * k
    roi = pixels[top:top + height, left:left + width]
    if roi.shape[:2] != (height, width):  # past the image edge: pad whole blocks with black
        roi = cv2.copyMakeBorder(roi, 0, height - roi.shape[0], 0, width - roi.shape[1], cv2.BORDER_CONSTANT,
                                 value=(0, 0, 0))
    return cv2.resize(roi, (width // k, height // k), interpolation=cv2.INTER_AREA)


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of an ``(H, W, 3)`` uint8 BGR array (deterministic for equal pixels).

    Chroma is kept at full resolution (4:4:4): the usual 4:2:0 halves colour
    resolution again on crops that are already tiny (measured on coco-mini at
    64x48: +0.6 grey levels mean error for ~20% fewer bytes). OpenCV's encoder
    (same libjpeg-turbo) has less per-call overhead than PIL's on small images.
    """
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
              cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    ok, data = cv2.imencode(".jpg", pixels, params)
    if not ok:
        raise ValueError(f"JPEG encoding failed for a crop of shape {pixels.shape}")
    return data.tobytes()
