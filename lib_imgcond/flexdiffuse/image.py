"""FlexDiffuse's guidance-image preprocessing: the CLIP normalisations, and the original's pipeline step by step.

:func:`normalize_image` is the proper CLIP normalisation of [0, 1] data (the corrected mode);
:func:`normalize_image_compat` is the original's ([0, 1] scaled to [−1, 1] first).

The original (tim-speed/flexdiffuse, HEAD 2022-10-16) prepares a guidance image in three stages:

1. resize the PIL image with LANCZOS so that its long side is 512 and its short side is the proportional length
   *floored to a multiple of 64* (a square becomes 512²). This distorts the aspect ratio: 500×300 (1.667) becomes
   512×256 (2.0). The PIL part is the host's (it holds the PIL image); :func:`compat_resize_size` gives the size;
2. scale the 8-bit pixels to [−1, 1] (``2x − 1``), centre-crop the largest square (offsets rounded as torchvision's
   ``center_crop`` does: ``round((side − crop) / 2)``), and resize it to the encoder's input size with bicubic
   interpolation and antialiasing, *without* clamping or 8-bit quantisation;
3. apply the CLIP mean/std normalisation to that [−1, 1] data (CLIP expects [0, 1]).

:func:`compat_pixels` does stages 2 and 3 on the LANCZOS-resized image. The bicubic resize is computed in float64
(the original's float32 kernel differs from the exact result by its rounding, up to a few 1e-5 on noise).

Where the original fails — a short side that floors to 0 (an image more than 16 times wider than high) makes PIL
raise — the short side is kept at 64, the smallest the original produces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.flexdiffuse.params import CLIP_MEAN, CLIP_STD

__all__ = [
    "LONG_SIDE",
    "MULTIPLE",
    "center_crop_box",
    "compat_pixels",
    "compat_resize_size",
    "normalize_image",
    "normalize_image_compat",
]

LONG_SIDE = 512
MULTIPLE = 64


def compat_resize_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of the original's first LANCZOS resize: long side 512, short side floored to a multiple of 64
    (at least 64)."""
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ArgumentError(name, v, "a positive integer")
    if width == height:
        return LONG_SIDE, LONG_SIDE
    if height > width:
        short = (int(width / (height / LONG_SIDE)) // MULTIPLE) * MULTIPLE  # the original's float arithmetic
        return max(MULTIPLE, short), LONG_SIDE
    short = (int(height / (width / LONG_SIDE)) // MULTIPLE) * MULTIPLE
    return LONG_SIDE, max(MULTIPLE, short)


def center_crop_box(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the centred square crop, with torchvision's rounding of the offsets."""
    side = min(height, width)
    return round((height - side) / 2.0), round((width - side) / 2.0), side


def compat_pixels(resized01: torch.Tensor, size: int) -> torch.Tensor:
    """The LANCZOS-resized image as (B, 3, h, w) floats in [0, 1] (8-bit values / 255) → the original's normalised
    (B, 3, size, size) float32 encoder input (stages 2 and 3 of the module docstring)."""
    if not isinstance(resized01, torch.Tensor) or resized01.ndim != 4 or resized01.shape[1] != 3:
        shape = tuple(resized01.shape) if isinstance(resized01, torch.Tensor) else type(resized01).__name__
        raise ArgumentError("image", shape, "a (B, 3, H, W) tensor")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ArgumentError("size", size, "a positive integer")
    x = resized01.to(torch.float64) * 2.0 - 1.0
    top, left, side = center_crop_box(*x.shape[-2:])
    x = x[:, :, top : top + side, left : left + side]
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean.to(x.device)) / std.to(x.device)).float()  # CLIP's normalisation, on [-1, 1] data


# --------------------------------------------------------------------------------------------------
# 5. Image preprocessing


def _check_image(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.shape[-3] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ImgcondError(f"expected an RGB image tensor (B, 3, H, W), got {shape}")
    if not x.is_floating_point():
        raise ImgcondError(f"expected a float image in [0, 1], got dtype {x.dtype}")


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (3, 1, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).reshape(shape)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).reshape(shape)
    return mean, std


def normalize_image(x01: torch.Tensor) -> torch.Tensor:
    """Correct CLIP normalisation of a (B, 3, H, W) image in [0, 1]: (x - mean) / std."""
    _check_image(x01)
    mean, std = _mean_std(x01)
    return (x01 - mean) / std


def normalize_image_compat(x01: torch.Tensor) -> torch.Tensor:
    """The original's preprocessing: scale [0, 1] to [-1, 1], then CLIP mean/std normalisation."""
    _check_image(x01)
    mean, std = _mean_std(x01)
    return (x01 * 2.0 - 1.0 - mean) / std
