"""Flux Redux control: the Redux projector, reference-image preparation, token downsampling/masking/weighting,
and the attention bias that scales the Redux tokens' influence.

Pipeline for one reference image (mirrors the "ReduxAdvanced" node, minus its crashes):

1. :func:`prepare` — crop / letterbox / autocrop to the SigLIP input size (384², or 512² for the patch-16 model);
2. :func:`encode_tokens` — SigLIP ``last_hidden_state`` → Redux MLP → (B, P², 4096);
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
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.vision.config import describe_keys
from lib_imgcond.vision.transformer import VisionTransformer, preprocess

__all__ = [
    "DOWNSAMPLE_MODES",
    "MODES",
    "PRESETS",
    "ReduxProjector",
    "apply_weight",
    "attention_bias",
    "downsample",
    "encode_tokens",
    "load_redux",
    "prepare",
    "preset_tokens",
    "select",
    "token_count",
    "token_mask",
]

MODES = ("center_crop", "keep_aspect", "autocrop")
DOWNSAMPLE_MODES = ("nearest", "bilinear", "bicubic", "area", "nearest-exact")
PRESETS = {"highest": 1, "high": 2, "medium": 3, "low": 4, "lowest": 5}
_REDUX_KEYS = ("redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias")
_REDUX_FILE = "the Flux Redux style model (flux1-redux-dev.safetensors)"


# ----------------------------------------------------------------------------------------------- projector


class ReduxProjector(nn.Module):
    """The Redux MLP: ``redux_down(silu(redux_up(x)))``, 1152 → 12288 → 4096 in the released model."""

    def __init__(self, in_dim: int = 1152, hidden_dim: int = 12288, out_dim: int = 4096):
        super().__init__()
        self.redux_up = nn.Linear(in_dim, hidden_dim)
        self.redux_down = nn.Linear(hidden_dim, out_dim)

    @property
    def in_features(self) -> int:
        return self.redux_up.in_features

    @property
    def out_features(self) -> int:
        return self.redux_down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.redux_down(F.silu(self.redux_up(x)))


def load_redux(
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    source: str = "",
) -> ReduxProjector:
    """Build a :class:`ReduxProjector` from a Redux state dict; dims come from the shapes.

    Raises :class:`ImgcondError` for other files (an old T2I style adapter, a vision encoder, ...) and for
    extra, missing or inconsistent tensors.
    """
    what = source or "the file"
    keys = set(state_dict)
    if "redux_down.weight" not in keys:
        raise ImgcondError(f"{what} looks like {describe_keys(keys)}, expected {_REDUX_FILE}")
    missing, extra = set(_REDUX_KEYS) - keys, keys - set(_REDUX_KEYS)
    if missing or extra:
        detail = "; ".join(
            p
            for p in (
                f"missing {sorted(missing)}" if missing else "",
                f"unexpected {sorted(extra)[:5]}" if extra else "",
            )
            if p
        )
        raise ImgcondError(f"{what} is not a plain Redux model ({detail}); expected {_REDUX_FILE}")
    shapes = {k: tuple(state_dict[k].shape) for k in _REDUX_KEYS}
    up_w, down_w = shapes["redux_up.weight"], shapes["redux_down.weight"]
    ok = (
        len(up_w) == 2
        and len(down_w) == 2
        and down_w[1] == up_w[0]
        and shapes["redux_up.bias"] == (up_w[0],)
        and shapes["redux_down.bias"] == (down_w[0],)
    )
    if not ok:
        raise ImgcondError(f"{what}: inconsistent Redux tensor shapes {shapes}; expected {_REDUX_FILE}")
    with torch.device("meta"):
        model = ReduxProjector(up_w[1], up_w[0], down_w[0])
    tensors = {k: state_dict[k].to(device=device, dtype=dtype) for k in _REDUX_KEYS}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def encode_tokens(
    vision_model: VisionTransformer, projector: ReduxProjector, prepared_image: torch.Tensor
) -> torch.Tensor:
    """Prepared (B,3,S,S) images in [0,1] (S = the encoder's input size) → Redux tokens (B, P², out_dim).

    Runs on the devices/dtypes of the two models; the result has the projector's device and dtype.
    """
    cfg = vision_model.config
    if cfg.kind != "siglip":
        raise ImgcondError(f"Redux needs a SigLIP vision encoder, but {cfg.source or 'the encoder'} is {cfg.name}")
    if cfg.hidden != projector.in_features:
        raise ImgcondError(
            f"the Redux model expects {projector.in_features}-dim vision features, but {cfg.name} gives {cfg.hidden}"
        )
    if prepared_image.ndim == 3:
        prepared_image = prepared_image.unsqueeze(0)
    if prepared_image.ndim != 4 or tuple(prepared_image.shape[1:]) != (3, cfg.image_size, cfg.image_size):
        raise ArgumentError(
            "prepared_image", tuple(prepared_image.shape), f"(B, 3, {cfg.image_size}, {cfg.image_size})"
        )
    vparam = vision_model.vision_model.embeddings.patch_embedding.weight
    pixels = preprocess(prepared_image, cfg).to(device=vparam.device)
    hidden = vision_model(pixels).last_hidden_state
    pparam = projector.redux_up.weight
    return projector(hidden.to(device=pparam.device, dtype=pparam.dtype))


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
