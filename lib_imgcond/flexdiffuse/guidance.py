"""CLIP image guidance of a text prompt, after FlexDiffuse (tim-speed/flexdiffuse, ``guidance.py``).

Every image token is compared with every text token of a 77-token prompt chunk; each text position
gets a matching image token and a match score, and a per-position weight decides how far the text
token is pulled toward (or replaced by) its image token. The result replaces the positive text
conditioning. Pure torch; nothing here knows about Forge.

Two modes
---------
``compatible=True`` reproduces the original (HEAD 2022-10-16) exactly, quirks included:

* the match stored in slot ``k`` belongs to text token ``k + 1`` but is applied to text position
  ``k`` (off by one), and the last slot (no match, score 0) still pulls the last text position toward
  image token 0 by ``min(w, max_guidance)``;
* the header (position 0) is pulled toward the image token matched to text token 1;
* "already filled" is tested as ``score > 0``, so a slot whose best score underflows to exactly 0 is
  overwritten by every later zero-score candidate (with reuse it ends on the last image token; without
  reuse it also uses up the image tokens it passes through);
* in concept mapping, a concept token that got no image token (fewer image tokens than concept tokens)
  maps to image token 0;
* images are prepared by the original's own pipeline (LANCZOS to long side 512 with the short side floored to a
  multiple of 64, [-1, 1] crop, unclamped bicubic resize) and CLIP-normalised from [-1, 1] data
  (:mod:`lib_imgcond.flexdiffuse.image`).
The seed-era version (2022-09-30) that zeroed text position 76 is not reproduced.

``compatible=False`` (default, "corrected") keeps every rule but removes the shift: slot ``t`` holds
the match for text token ``t`` and is applied to position ``t``. Slot 0 (the BOS header) has no
text match; it is paired with image token 0 (the CLS token) and score 0, so the header moves toward
the CLS token only by the header-capped weight (``header_max``, default 0 = untouched). Any other
slot with score 0 (no image token left without reuse, or no alignment at all) is left unchanged.
"Filled" is a flag, not ``score > 0``. In "direct" priority, slot ``t`` is image token ``t`` for every
``t`` including 0. Concept tokens without an image token are skipped. Images use the proper CLIP
normalisation of [0, 1] data (:func:`normalize_image`).

In both modes clustered guidance treats a run of adjacent equal peaks (a plateau, e.g. two tokens
both saturating to score 1.0) as one flat-topped peak, and every division is guarded; the original
raised ZeroDivisionError there. Batches of several prompts are handled row by row (the original
raised IndexError).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.flexdiffuse.matching import map_embeddings, slot_weights
from lib_imgcond.flexdiffuse.params import (
    CHUNK,
    DIRECT_HEADER_PULL,
    SDXL_G_DIM,
    SDXL_L_DIM,
    FlexParams,
    _as_2d,
    _check_finite,
    _compute_dtype,
    _cpu64,
    _dim_error,
)

# --------------------------------------------------------------------------------------------------
# 3. Tween


def tween(
    txt: torch.Tensor,
    img: torch.Tensor,
    idx: torch.Tensor,
    scores: torch.Tensor,
    weights: torch.Tensor,
    max_guidance: float,
    *,
    compatible: bool = False,
) -> torch.Tensor:
    """Move each text position t toward image token idx[t] by iw = min(weights[t], max_guidance).

    iw == 0: keep; |iw| ≥ 1 - score[t]: replace by the image token (also for negative iw); otherwise
    txt_t + iw·(img - txt_t) (negative iw pushes away). Corrected mode leaves slots with score 0
    unchanged except position 0 (header ↔ CLS pairing, see module docstring).
    Returns a new tensor of txt's shape and dtype.
    """
    txt2 = _as_2d(txt, "text tokens")
    img = _as_2d(img, "image tokens")
    n = txt2.shape[0]
    if not (idx.shape[0] == scores.shape[0] == weights.shape[0] == n):
        raise ImgcondError(
            f"tween needs one index, score and weight per text token: got {idx.shape[0]}, "
            f"{scores.shape[0]}, {weights.shape[0]} for {n} tokens"
        )
    if img.shape[1] != txt2.shape[1]:
        raise _dim_error(img.shape[1], txt2.shape[1])
    s = _cpu64(scores)
    iw = torch.clamp(_cpu64(weights), max=float(max_guidance))
    keep = iw == 0
    if not compatible:
        no_match = s == 0
        no_match[0] = False
        keep = keep | no_match
    replace = ~keep & (iw.abs() >= 1.0 - s)
    move = ~keep & ~replace

    dtype = _compute_dtype(torch.promote_types(txt2.dtype, img.dtype))
    dev = txt2.device
    t = txt2.to(dtype)
    target = img.to(device=dev, dtype=dtype)[idx.to(device=dev, dtype=torch.long)]
    moved = t + (target - t) * iw.to(dtype).to(dev).unsqueeze(1)
    out = torch.where(move.to(dev).unsqueeze(1), moved, t)
    out = torch.where(replace.to(dev).unsqueeze(1), target, out)
    return out.to(txt.dtype).reshape(txt.shape)


# --------------------------------------------------------------------------------------------------
# 4. Concepts and direct guidance


def concept_map(
    base_txt: torch.Tensor,
    concept_txt: torch.Tensor,
    img: torch.Tensor,
    threshold: float = 0.9,
    *,
    out: torch.Tensor | None = None,
    compatible: bool = False,
) -> torch.Tensor:
    """Replace prompt tokens that match a concept token (score > threshold) by that concept's image token.

    Concept tokens are assigned image tokens without reuse in text order; each prompt token (not the
    header) is matched to its best concept token with reuse, best fit. The result is written into a
    copy of ``out`` (the tweened embedding; default base_txt); max_guidance does not apply. The index
    shift of the compatible mapping is compensated as in the original; the results of both modes only
    differ when a score is exactly 0 (corrected mode skips concept tokens that got no image token).
    """
    base = _as_2d(base_txt, "text tokens")
    concept = _as_2d(concept_txt, "concept tokens")
    img = _as_2d(img, "image tokens")
    if concept.shape[1] != base.shape[1]:
        raise _dim_error(concept.shape[1], base.shape[1], "concept tokens")
    result = (base if out is None else _as_2d(out, "output tokens")).clone()
    if result.shape != base.shape:
        raise ImgcondError(f"output shape {tuple(result.shape)} differs from the prompt's {tuple(base.shape)}")
    offset = 1 if compatible else 0
    c_idx, c_score = map_embeddings(img, concept, reuse=False, priority="text_order", compatible=compatible)
    b_idx, b_score = map_embeddings(concept, base, reuse=True, priority="best_fit", compatible=compatible)
    c_idx, c_score = c_idx.cpu().tolist(), _cpu64(c_score).tolist()
    b_idx, b_score = b_idx.cpu().tolist(), _cpu64(b_score).tolist()
    src = img.to(device=result.device, dtype=result.dtype)
    for t in range(1, base.shape[0]):
        slot = t - offset
        c = b_idx[slot]
        if c < 1 or b_score[slot] <= threshold:  # concept header, or too weak a match
            continue
        cslot = c - offset
        if not compatible and c_score[cslot] == 0:
            continue
        result[t] = src[c_idx[cslot]]
    out_like = base_txt if out is None else out
    return result.reshape(out_like.shape)


def direct_guidance(img: torch.Tensor, header: torch.Tensor, length: int = CHUNK) -> torch.Tensor:
    """Guidance without a prompt: image tokens 0..length-1, token 0 moved 85 % toward ``header``.

    header: (D,) the header (BOS) hidden state of a placeholder prompt such as "{}".
    """
    img = _as_2d(img, "image tokens")
    header = header.reshape(-1)
    if header.shape[0] != img.shape[1]:
        raise _dim_error(img.shape[1], header.shape[0])
    if img.shape[0] < length:
        raise ImgcondError(
            f"direct image guidance needs at least {length} image tokens, the encoder gave {img.shape[0]}"
        )
    out = img[:length].clone()
    h = header.to(device=out.device, dtype=out.dtype)
    out[0] = out[0] + (h - out[0]) * DIRECT_HEADER_PULL
    return out


# --------------------------------------------------------------------------------------------------
# 6. Whole conditionings


def split_sdxl(cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split SDXL crossattn (..., 2048) into the CLIP-L (768) and CLIP-G (1280) halves."""
    if cond.shape[-1] != SDXL_L_DIM + SDXL_G_DIM:
        raise ImgcondError(f"SDXL cross-attention should be {SDXL_L_DIM + SDXL_G_DIM}-d, got {cond.shape[-1]}-d")
    return cond[..., :SDXL_L_DIM], cond[..., SDXL_L_DIM:]


def join_sdxl(l_part: torch.Tensor, g_part: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_sdxl`."""
    if l_part.shape[-1] != SDXL_L_DIM or g_part.shape[-1] != SDXL_G_DIM or l_part.shape[:-1] != g_part.shape[:-1]:
        raise ImgcondError(
            f"cannot join SDXL halves of shapes {tuple(l_part.shape)} and {tuple(g_part.shape)}: "
            f"expected (..., {SDXL_L_DIM}) and (..., {SDXL_G_DIM})"
        )
    return torch.cat([l_part, g_part.to(device=l_part.device, dtype=l_part.dtype)], dim=-1)


def _concept_chunks(concept: torch.Tensor | None, batch: int, dim: int, chunk: int) -> list[list[torch.Tensor]] | None:
    """Per batch row, the concept prompt as a list of chunks."""
    if concept is None:
        return None
    if not isinstance(concept, torch.Tensor) or concept.dim() not in (2, 3):
        raise ImgcondError("the concept embedding must be a tensor (tokens, dim) or (batch, tokens, dim)")
    rows = concept.unsqueeze(0) if concept.dim() == 2 else concept
    if rows.shape[0] not in (1, batch):
        raise ImgcondError(f"the concept embedding has batch {rows.shape[0]}, the prompt has batch {batch}")
    if rows.shape[-1] != dim:
        raise _dim_error(rows.shape[-1], dim, "concept tokens")
    if rows.shape[1] == 0 or rows.shape[1] % chunk:
        raise ImgcondError(f"the concept embedding has {rows.shape[1]} tokens, expected a multiple of {chunk}")
    _check_finite(rows, "concept tokens")
    per_row = [list(r.split(chunk, dim=0)) for r in rows]
    return per_row * batch if len(per_row) == 1 else per_row


def guide_chunks(
    text_cond: torch.Tensor,
    image_tokens: Sequence[tuple[torch.Tensor, float]],
    params: FlexParams,
    concept: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Guide a text conditioning (B, 77·k, D) (or (77·k, D)) by one or more images.

    Every batch row and every 77-token chunk is mapped and tweened separately; with a concept prompt
    each of its chunks is then applied in turn. Each image j gives its own guided embedding g_j; they
    are combined as text + Σ_j weight_j·(g_j - text) (a single image of weight 1 gives g_1 exactly;
    weight 0 skips an image). With all multipliers 0 and no concept the result equals the input
    bitwise. Returns a new tensor of the input's shape, dtype and device.
    """
    params.validate()
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 2:
        raise ArgumentError("chunk", chunk, "an integer of at least 2")
    if not isinstance(text_cond, torch.Tensor) or text_cond.dim() not in (2, 3):
        raise ImgcondError("the text conditioning must be a tensor (batch, tokens, dim) or (tokens, dim)")
    x = text_cond.unsqueeze(0) if text_cond.dim() == 2 else text_cond
    batch, n_tok, dim = x.shape
    if n_tok == 0 or n_tok % chunk:
        raise ImgcondError(f"the text conditioning has {n_tok} tokens, expected a multiple of {chunk}")

    images: list[tuple[torch.Tensor, float]] = []
    for j, item in enumerate(image_tokens):
        if isinstance(item, torch.Tensor):
            item = (item, 1.0)
        tokens, weight = item
        tokens = _as_2d(tokens, f"image {j + 1} tokens")
        if tokens.shape[1] != dim:
            raise _dim_error(tokens.shape[1], dim)
        if tokens.shape[0] == 0:
            raise ImgcondError(f"guidance image {j + 1} produced no tokens")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ArgumentError(f"image {j + 1} weight", weight, "a finite number")
        if weight != 0:
            images.append((tokens, float(weight)))
    if not images or (params.multipliers_zero and concept is None):
        return text_cond.clone()

    concepts = _concept_chunks(concept, batch, dim, chunk)
    _check_finite(x, "text embeddings")
    cdtype = _compute_dtype(x.dtype)
    dev = x.device
    xc = x.to(cdtype)
    prepared = []
    for j, (tokens, weight) in enumerate(images):
        _check_finite(tokens, f"image {j + 1} tokens")
        prepared.append((tokens.to(device=dev, dtype=cdtype), weight))

    single = len(prepared) == 1 and prepared[0][1] == 1.0
    rows = []
    for b in range(batch):
        pieces = []
        for txt in xc[b].split(chunk, dim=0):
            acc = None
            for tokens, weight in prepared:
                guided = _guide_one(txt, tokens, params, concepts[b] if concepts is not None else None)
                if single:
                    acc = guided
                else:
                    delta = (guided - txt) * weight
                    acc = delta if acc is None else acc + delta
            pieces.append(acc if single else txt + acc)
        rows.append(torch.cat(pieces, dim=0))
    out = torch.stack(rows, dim=0).to(text_cond.dtype)
    return out.reshape(text_cond.shape)


def _guide_one(
    txt: torch.Tensor, img: torch.Tensor, params: FlexParams, concept_chunks: list[torch.Tensor] | None
) -> torch.Tensor:
    """Guided embedding of one text chunk by one image."""
    compat = params.compatible
    idx, score = map_embeddings(img, txt, params.reuse, params.priority, compat)
    weights = slot_weights(score, params)
    out = tween(txt, img, idx, score, weights, params.max_guidance, compatible=compat)
    for concept in concept_chunks or ():
        out = concept_map(txt, concept.to(txt.dtype), img, params.concept_threshold, out=out, compatible=compat)
    return out
