"""Redux reference-image preparation (step 1 of :mod:`lib_imgcond.redux.tokens`): crop, letterbox or autocrop to the
SigLIP input size, and the checks of a painted selection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.redux.tokens import token_mask

MODES = ("center_crop", "keep_aspect", "autocrop")

# ----------------------------------------------------------------------------------------------- image preparation


def _bicubic(x: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    """Bicubic resize of a (C,h,w) or (h,w) tensor, clamped to [0,1]; identity when the size already matches."""
    if tuple(x.shape[-2:]) == size:
        return x
    batched = x.reshape(1, -1, *x.shape[-2:])
    out = F.interpolate(batched, size=size, mode="bicubic", align_corners=False, antialias=antialias)
    return out.reshape(*x.shape[:-2], *size).clamp(0.0, 1.0)


def _grow(lo: int, hi: int, side: int, limit: int) -> tuple[int, int]:
    """Widen [lo, hi) to ``side`` inside [0, limit): centred where possible, pushed off the borders otherwise."""
    delta = side - (hi - lo)
    if delta <= 0:
        return lo, hi
    before = min(delta // 2, lo)
    after = min(delta - before, limit - hi)
    before += min(delta - before - after, lo - before)
    return lo - before, hi + after


def _autocrop_box(mask: torch.Tensor, margin: float, size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the autocrop square. As in the original, the largest mask index is used as the exclusive
    end (so the box is one pixel short of the true extent before the margin is added)."""
    height, width = mask.shape
    ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    mx, my = math.ceil(margin * width), math.ceil(margin * height)
    x0, x1 = max(0, int(xs.min()) - mx), min(width, int(xs.max()) + mx)
    y0, y1 = max(0, int(ys.min()) - my), min(height, int(ys.max()) + my)
    side = max(x1 - x0, y1 - y0, size)
    x0, x1 = _grow(x0, x1, side, width)
    y0, y1 = _grow(y0, y1, side, height)
    return x0, y0, x1, y1


def _letterbox(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = image.shape[-2:]
    scale = size / max(height, width)
    w = min(size, max(1, round(width * scale)))
    h = min(size, max(1, round(height * scale)))
    ox, oy = (size - w) // 2, (size - h) // 2
    canvas = image.new_zeros(3, size, size)
    canvas[:, oy : oy + h, ox : ox + w] = _bicubic(image, (h, w), antialias=True)
    mask_canvas = mask.new_zeros(size, size)
    mask_canvas[oy : oy + h, ox : ox + w] = _bicubic(mask, (h, w), antialias=False)
    return canvas, mask_canvas


def _center_crop(image: torch.Tensor, mask: torch.Tensor | None, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    w, h = max(size, round(width * scale)), max(size, round(height * scale))
    ox, oy = (w - size) // 2, (h - size) // 2
    image = _bicubic(image, (h, w), antialias=True)[:, oy : oy + size, ox : ox + size]
    if mask is not None:
        mask = _bicubic(mask, (h, w), antialias=False)[oy : oy + size, ox : ox + size]
    return image, mask


def prepare(
    image: torch.Tensor,
    mask: torch.Tensor | None = None,
    mode: str = "center_crop",
    size: int = 384,
    margin: float = 0.1,
    patch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fit a (3,H,W) image in [0,1] (and an optional (H,W) mask in [0,1]) to the ``size``² encoder input.

    Modes: ``center_crop`` (short side → size, centre crop), ``keep_aspect`` (long side → size, centred on black;
    the mask — all ones when none is given — is zero on the padding), ``autocrop`` (mask required: square box around
    the mask plus ``margin``·W / ``margin``·H, at least ``size`` px where the image allows, then as keep_aspect).
    Images use bicubic + antialias, masks bicubic without antialias (as the original); both are clamped to [0,1].
    Returns (image (3,size,size) float32, mask (size,size) float32 or None). The mask is None only for
    center_crop without a mask. Raises :class:`ImgcondError` for a missing/empty/mis-sized mask, or one that
    selects nothing once prepared (e.g. lies outside the centre-crop window). With ``patch`` (the encoder's patch
    size) "nothing" is judged on the token mask that is actually used (:func:`token_mask`): resampling ringing
    that survives only in the trailing pixels no patch covers (384 = 27·14 + 6) does not count as a selection.
    """
    if mode not in MODES:
        raise ArgumentError("mode", mode, " / ".join(MODES))
    if not isinstance(size, int) or size < 1:
        raise ArgumentError("size", size, "a positive integer")
    if patch is not None and (isinstance(patch, bool) or not isinstance(patch, int) or not 1 <= patch <= size):
        raise ArgumentError("patch", patch, f"an integer from 1 to {size}")
    if not (isinstance(margin, (int, float)) and 0.0 <= margin <= 1.0):
        raise ArgumentError("margin", margin, "a number from 0 to 1")
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3 or image.numel() == 0:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ArgumentError("image", shape, "a (3, H, W) tensor")
    image = image.float()
    height, width = image.shape[-2:]
    if mask is not None:
        while mask.ndim > 2 and mask.shape[0] == 1:
            mask = mask[0]
        if tuple(mask.shape) != (height, width):
            size_txt = "×".join(map(str, tuple(mask.shape)[::-1]))
            raise ImgcondError(f"the mask is {size_txt} pixels but the image is {width}×{height}; they must match")
        mask = mask.float().clamp(0.0, 1.0)
        if not bool((mask > 0).any()):
            raise ImgcondError("the mask is empty (all zero): paint the region to use, or remove the mask")
    elif mode == "autocrop":
        raise ImgcondError("autocrop needs a mask: paint the region to crop around, or choose another mode")

    if mode == "center_crop":
        image, mask = _center_crop(image, mask, size)
    else:
        if mode == "autocrop":
            x0, y0, x1, y1 = _autocrop_box(mask, float(margin), size)
            image, mask = image[:, y0:y1, x0:x1], mask[y0:y1, x0:x1]
        elif mask is None:
            mask = image.new_ones(height, width)
        image, mask = _letterbox(image, mask, size)

    if mask is not None:
        _check_selection(mask, mode, size, patch)
    return image.contiguous(), None if mask is None else mask.contiguous()


def _check_selection(mask: torch.Tensor, mode: str, size: int, patch: int | None) -> None:
    """Raise when the prepared mask selects nothing: no pixel > 0, or (with ``patch``) no token."""
    where = "outside the centre-crop window" if mode == "center_crop" else f"lost when scaling to {size}²"
    if not bool((mask > 0).any()):
        raise ImgcondError(f"the mask is {where}; use keep_aspect or autocrop, or paint a larger region")
    if patch is not None and not bool((token_mask(mask, patch) > 0).any()):
        grid = size // patch
        raise ImgcondError(
            f"the mask selects no token: it is {where} (only faint resampling traces remain, in the last "
            f"{size - grid * patch} pixel rows/columns that no {patch}×{patch} patch of the {grid}×{grid} token grid "
            "covers); use keep_aspect or autocrop, or paint a larger region"
        )
