"""Flux Redux control: token downsampling/masking/weighting and the attention bias that scales the Redux tokens'
influence. Steps 1 and 2 of the pipeline are in :mod:`lib_imgcond.redux.image` and :mod:`lib_imgcond.redux.projector`.

Pipeline for one reference image (mirrors the "ReduxAdvanced" node, minus its crashes):

1. :func:`image.prepare` — crop / letterbox / autocrop to the SigLIP input size (384², or 512² for the patch-16 model);
2. :func:`projector.encode_tokens` — SigLIP ``last_hidden_state`` → Redux MLP → (B, P², 4096);
3. :func:`token_mask` — the prepared mask max-pooled per patch → (g, g) soft token weights;
4. :func:`downsample` (or :func:`preset_tokens` for the simple presets) — fewer tokens;
5. :func:`apply_weight` — tokens · weight²;
6. :func:`select` — keep only tokens whose (downsampled) mask is > 0, in raster order;
7. the caller appends the tokens after the T5 tokens, and optionally uses :func:`attention_bias` for a strength.

Tokens are always (B, N, D) with one image per batch row and N = side² per image, so several images never need
the square-root-of-the-whole-sequence trick that makes the original crash.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lib_imgcond.common.errors import ArgumentError, ImgcondError

__all__ = [
    "DOWNSAMPLE_MODES",
    "PRESETS",
    "apply_weight",
    "attention_bias",
    "downsample",
    "preset_tokens",
    "select",
    "token_count",
    "token_mask",
]

DOWNSAMPLE_MODES = ("nearest", "bilinear", "bicubic", "area", "nearest-exact")
PRESETS = {"highest": 1, "high": 2, "medium": 3, "low": 4, "lowest": 5}


# ----------------------------------------------------------------------------------------------- token operations


def token_mask(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """(S,S) pixel mask → (S//patch, S//patch) soft token mask: the max over each patch; trailing pixels that the
    patch convolution also drops (384 = 27·14 + 6) are ignored."""
    if mask.ndim != 2:
        raise ArgumentError("mask", tuple(mask.shape), "an (S, S) tensor")
    if not isinstance(patch, int) or patch < 1 or patch > min(mask.shape):
        raise ArgumentError("patch", patch, f"an integer from 1 to {min(mask.shape)}")
    return F.max_pool2d(mask.float()[None, None], kernel_size=patch, stride=patch)[0, 0]


def _grid(tokens: torch.Tensor) -> int:
    if tokens.ndim != 3:
        raise ArgumentError("tokens", tuple(tokens.shape), "a (B, N, D) tensor with one image per batch row")
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1] or side == 0:
        raise ImgcondError(
            f"{tokens.shape[1]} tokens per image do not form a square grid; pass one image per batch row "
            "(B, side², D) rather than several images flattened into one sequence"
        )
    return side


def _resample(tokens: torch.Tensor, grid: int, side: int, mode: str) -> torch.Tensor:
    """(B, grid², D) → (B, side², D) through a 2-D interpolation of the token grid (computed in float32)."""
    b, _, d = tokens.shape
    x = tokens.float().reshape(b, grid, grid, d).permute(0, 3, 1, 2)
    extra = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    x = F.interpolate(x, size=(side, side), mode=mode, **extra)
    return x.permute(0, 2, 3, 1).reshape(b, side * side, d).to(tokens.dtype)


def preset_tokens(tokens: torch.Tensor, preset: str) -> torch.Tensor:
    """The simple node's image strengths: side = grid // f for f = PRESETS[preset]; area at f = 3, else bicubic.
    729 tokens → 729 / 169 / 81 / 36 / 25 for highest … lowest."""
    if preset not in PRESETS:
        raise ArgumentError("preset", preset, " / ".join(PRESETS))
    grid, f = _grid(tokens), PRESETS[preset]
    if f == 1:
        return tokens
    return _resample(tokens, grid, max(1, grid // f), "area" if f == 3 else "bicubic")


def _check_factor_mode(factor: float, mode: str) -> float:
    if mode not in DOWNSAMPLE_MODES:
        raise ArgumentError("mode", mode, " / ".join(DOWNSAMPLE_MODES))
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1.0 <= factor <= 9.0:
        raise ArgumentError("factor", factor, "a number from 1 to 9")
    return float(factor)


def _check_tmask(tmask: torch.Tensor | None, grid: int) -> None:
    if tmask is not None and tuple(tmask.shape) != (grid, grid):
        raise ArgumentError("tmask", tuple(tmask.shape), f"a ({grid}, {grid}) token mask")


def _shrink_tmask(tmask: torch.Tensor, side: int) -> torch.Tensor:
    return F.interpolate(tmask.float()[None, None], size=(side, side), mode="area")[0, 0]


def downsample(
    tokens: torch.Tensor, factor: float, mode: str = "area", tmask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shrink each image's token grid by ``factor`` (1–9): side = round(grid / factor) (Python rounding).

    With a token mask, tokens are first multiplied by the soft mask and the mask is shrunk with ``area``.
    ``factor`` 1 leaves tokens and mask unchanged (the mask then only selects). Returns (tokens, tmask).
    """
    factor = _check_factor_mode(factor, mode)
    grid = _grid(tokens)
    _check_tmask(tmask, grid)
    if factor <= 1.0:
        return tokens, tmask
    side = max(1, round(grid / factor))
    if tmask is not None:
        tokens = tokens * tmask.reshape(1, grid * grid, 1).to(tokens.device, tokens.dtype)
        tmask = _shrink_tmask(tmask, side)
    return _resample(tokens, grid, side, mode), tmask


def select(tokens: torch.Tensor, tmask: torch.Tensor | None) -> torch.Tensor:
    """Keep the tokens whose mask value is > 0, in raster order → (B, K, D). No mask: all tokens."""
    if tmask is None:
        return tokens
    keep = tmask.reshape(-1) > 0
    if tokens.ndim != 3 or keep.numel() != tokens.shape[1]:
        raise ArgumentError("tmask", tuple(tmask.shape), f"{tokens.shape[1] if tokens.ndim == 3 else '?'} values")
    return tokens[:, keep.to(tokens.device)]


def apply_weight(tokens: torch.Tensor, weight: float) -> torch.Tensor:
    """Scale all tokens by weight² (the advanced node's weight, 0–1 in the UI)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight < math.inf:
        raise ArgumentError("weight", weight, "a finite number ≥ 0")
    return tokens * (float(weight) * float(weight))


def token_count(factor: float, mode: str = "area", mask: torch.Tensor | None = None, grid: int = 27) -> int:
    """How many tokens :func:`downsample` + :func:`select` will append for one image (for the UI).

    ``mask`` is the full-resolution (grid, grid) token mask from :func:`token_mask`, or None.
    """
    factor = _check_factor_mode(factor, mode)
    if not isinstance(grid, int) or grid < 1:
        raise ArgumentError("grid", grid, "a positive integer")
    _check_tmask(mask, grid)
    side = grid if factor <= 1.0 else max(1, round(grid / factor))
    if mask is None:
        return side * side
    if factor > 1.0:
        mask = _shrink_tmask(mask, side)
    return int((mask > 0).sum())


# ----------------------------------------------------------------------------------------------- strength


def attention_bias(
    n_txt: int,
    n_img: int,
    redux_spans: Sequence[tuple[int, int]],
    strength: float | Sequence[float],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Additive key bias for Flux joint attention over [txt (with the Redux tokens at ``redux_spans``) | img].

    Returns shape (1, 1, 1, n_txt + n_img), broadcasting over batch, heads and query rows (every query row gets
    the same bias); ``expand`` it if a kernel wants a full mask. Columns of Redux span i hold log(strength_i)
    (``strength`` is one number or one per span), all other columns 0. Strength 1 gives an all-zero bias;
    strength 0 gives ``-inf`` columns, which removes those tokens exactly. Rows never become all ``-inf``: only
    Redux columns are ever ``-inf``, and a bias that would exclude every column raises :class:`ImgcondError`
    (the caller must not combine it with other ``-inf`` masks that cover the remaining columns).
    Spans are half-open [start, end) inside [0, n_txt) and must not overlap.
    """
    for name, n in (("n_txt", n_txt), ("n_img", n_img)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ArgumentError(name, n, "an integer ≥ 0")
    spans = [(int(a), int(b)) for a, b in redux_spans]
    strengths = [strength] * len(spans) if isinstance(strength, (int, float)) else list(strength)
    if len(strengths) != len(spans):
        raise ArgumentError("strength", strength, f"one number, or one per span ({len(spans)})")
    for s in strengths:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < math.inf:
            raise ArgumentError("strength", s, "a finite number ≥ 0")
    previous_end = 0
    for a, b in sorted(spans):
        if not 0 <= a <= b <= n_txt or a < previous_end:
            raise ArgumentError("redux_spans", spans, f"non-overlapping [start, end) spans inside [0, {n_txt}]")
        previous_end = b
    bias = torch.zeros(1, 1, 1, n_txt + n_img, dtype=dtype, device=device)
    for (a, b), s in zip(spans, strengths, strict=True):
        if s != 1.0:
            bias[..., a:b] = math.log(s) if s > 0 else -math.inf
    if bias.numel() and bool(torch.isinf(bias).all()):
        raise ImgcondError("strength 0 on every attention column would leave nothing to attend to")
    return bias
