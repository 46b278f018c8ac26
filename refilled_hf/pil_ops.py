"""Pillow's 8-bit resampling and colour enhancement, batched on tensors with per-image
parameters: the pieces of timm's ImageNet training transform (random-resized crop, flip,
colour jitter) and its evaluation resize, for the device data path.

torchvision's tensor ops do these per call (one crop size, one jitter factor for the
whole batch) and with other arithmetic than the PIL ops the worker path runs (its
antialiased bicubic is Pillow-like but not Pillow-exact, its contrast uses a float grey
mean, it does not round between ops), so they are reimplemented here after Pillow's C
code (``Resample.c``, ``Blend.c``, ``Convert.c``, ``ImageEnhance.py``):

* resampling is Pillow's separable convolution: its filters, its support scaled by the
  reduction factor (antialiasing), its window clipped to the crop box, its 22-bit
  fixed-point coefficients and its rounding to ``uint8`` after the horizontal and the
  vertical pass. The passes are two batched matrix products with per-image weight
  matrices, in float64, where the fixed-point sums are exact.
* brightness, contrast and saturation are Pillow's ``Image.blend`` against the same
  degenerate images (black; the rounded mean of the ITU-R 601 luma; the luma), in
  float32 and truncated to whole levels as Pillow does. They take and return float32
  tensors of whole levels in ``[0, 255]``.

The tests compare every function here with Pillow, pixel for pixel.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "FILTERS",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "blend",
    "luma",
    "resample",
    "resize_weights",
    "rounded_mean",
]

_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images


def _box(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x <= 0.5)).to(x.dtype)


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp(min=0.0)


def _hamming(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    px = x * math.pi
    value = torch.sin(px) / px * (0.54 + 0.46 * torch.cos(px))
    return torch.where(x == 0, torch.ones_like(x), torch.where(x >= 1, torch.zeros_like(x), value))


def _bicubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _sinc(x: torch.Tensor) -> torch.Tensor:
    px = x * math.pi
    return torch.where(x == 0, torch.ones_like(x), torch.sin(px) / px)


def _lanczos(x: torch.Tensor) -> torch.Tensor:
    inside = (x >= -3.0) & (x < 3.0)
    return torch.where(inside, _sinc(x) * _sinc(x / 3.0), torch.zeros_like(x))


#: Pillow's convolution filters by timm's interpolation names: ``(function, support)``.
#: Pillow's ``nearest`` is not a convolution (it is an affine pixel lookup) and is not here.
FILTERS = {
    "box": (_box, 0.5),
    "bilinear": (_bilinear, 1.0),
    "hamming": (_hamming, 1.0),
    "bicubic": (_bicubic, 2.0),
    "lanczos": (_lanczos, 3.0),
}


def resize_weights(
    start: torch.Tensor,
    length: torch.Tensor,
    resized: torch.Tensor,
    out_size: int,
    offset: torch.Tensor,
    in_size: int,
    interpolation: str,
) -> torch.Tensor:
    """Per-image weight matrices ``[B, out_size, in_size]`` for one axis, as Pillow resizes
    the span ``[start, start + length)`` of each image (cropped first, as torchvision's
    ``resized_crop`` does) to ``resized`` pixels, of which output pixel ``o`` is resized pixel
    ``o + offset`` (a centre crop; outside ``[0, resized)``: zero padding).

    All arguments but the sizes are integer tensors ``[B]``. The weights are float64 and
    integer-valued: Pillow's 22-bit fixed-point coefficients. Pixels outside the span get 0.
    """
    function, support = FILTERS[interpolation]
    device = start.device

    def column(values: torch.Tensor) -> torch.Tensor:
        return values.to(torch.float64)[:, None, None]

    length, resized = column(length), column(resized)
    scale = length / resized
    filterscale = scale.clamp(min=1.0)
    support = support * filterscale
    # Positions along the crop, as in Pillow after the crop: the resized pixel r has its
    # centre at (r + 0.5) * scale, the crop's pixel p lies at p.
    target = torch.arange(out_size, device=device, dtype=torch.float64)[None, :, None] + column(offset)
    pixel = torch.arange(in_size, device=device, dtype=torch.float64)[None, None, :] - column(start)
    centre = (target + 0.5) * scale
    low = (centre - support + 0.5).trunc().clamp(min=0.0)
    high = torch.minimum((centre + support + 0.5).trunc(), length)
    inside = (pixel >= low) & (pixel < high) & (target >= 0) & (target < resized)
    weights = function((pixel - centre + 0.5) * (1.0 / filterscale)).masked_fill(~inside, 0.0)
    total = weights.sum(-1, keepdim=True)
    weights = weights / torch.where(total != 0, total, torch.ones_like(total))
    one = float(1 << _PRECISION_BITS)
    return torch.where(weights < 0, weights * one - 0.5, weights * one + 0.5).trunc()


def _round_fixed(sums: torch.Tensor) -> torch.Tensor:
    """Pillow's ``clip8``: fixed-point sums (plus the half) -> ``uint8`` values, as float64."""
    return torch.floor((sums + float(1 << (_PRECISION_BITS - 1))) / float(1 << _PRECISION_BITS)).clamp_(0.0, 255.0)


def _horizontal(images: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    count, channels, height, width = images.shape
    out = torch.bmm(images.reshape(count, channels * height, width), columns.transpose(1, 2))
    return _round_fixed(out).view(count, channels, height, -1)


def _vertical(images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    count, channels, height, width = images.shape
    flat = images.transpose(1, 2).reshape(count, height, channels * width)
    out = _round_fixed(torch.bmm(rows, flat))
    return out.view(count, rows.shape[1], channels, width).transpose(1, 2)


def resample(
    images: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, vertical_first: torch.Tensor | None = None
) -> torch.Tensor:
    """``uint8 [B, C, H, W]`` images resampled by per-image weight matrices ``rows``
    ``[B, h, H]`` and ``columns`` ``[B, w, W]`` (from :func:`resize_weights`), in two passes
    rounded to ``uint8`` each, as Pillow does: horizontal first, except for the images
    where ``vertical_first`` (``bool [B]``) is set. Returns ``uint8 [B, C, h, w]``."""
    pixels = images.to(torch.float64)
    out = _vertical(_horizontal(pixels, columns), rows)
    if vertical_first is not None:
        other = _horizontal(_vertical(pixels, rows), columns)
        out = torch.where(vertical_first.view(-1, 1, 1, 1), other, out)
    return out.to(torch.uint8)


def luma(levels: torch.Tensor) -> torch.Tensor:
    """Pillow's ``convert("L")``, ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``, of
    ``[B, 3, H, W]`` levels (float32, integer-valued): ``[B, 1, H, W]`` levels. Every partial
    sum stays below 2^24, so float32 computes it exactly."""
    total = levels[:, 0:1] * 19595.0 + levels[:, 1:2] * 38470.0 + levels[:, 2:3] * 7471.0 + 32768.0
    return total.div_(65536.0).floor_()


def rounded_mean(grey: torch.Tensor) -> torch.Tensor:
    """``int(ImageStat.Stat(grey).mean[0] + 0.5)`` per image of ``[B, 1, H, W]`` luma levels
    (from :func:`luma`): ``[B, 1, 1, 1]``."""
    mean = grey.mean(dim=(1, 2, 3), keepdim=True, dtype=torch.float64)
    return torch.floor(mean + 0.5).to(torch.float32)


def blend(degenerate: torch.Tensor, levels: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.blend(degenerate, image, factor)`` for 8-bit images, per image
    (``factor`` ``[B]``): ``degenerate + factor * (image - degenerate)`` in float32,
    clipped to ``[0, 255]`` and truncated, as Pillow's ``Blend.c``. Float32 levels in and out."""
    alpha = factor.to(torch.float32).view(-1, 1, 1, 1)
    return (levels - degenerate).mul_(alpha).add_(degenerate).clamp_(0.0, 255.0).trunc_()


def adjust_brightness(levels: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Brightness(image).enhance(factor)`` per image: blended with black."""
    return blend(torch.zeros((), device=levels.device), levels, factor)


def adjust_contrast(levels: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Contrast(image).enhance(factor)`` per image: blended with the
    image's mean luma, rounded to an integer."""
    return blend(rounded_mean(luma(levels)), levels, factor)


def adjust_saturation(levels: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Color(image).enhance(factor)`` per image: blended with its luma."""
    return blend(luma(levels), levels, factor)
