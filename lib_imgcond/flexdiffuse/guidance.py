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

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError

CHUNK = 77
"""Tokens per CLIP text chunk (SD1.x / SDXL)."""

PRIORITIES = ("text_order", "best_fit", "direct")
"""Mapping priorities: by text position, by best score first, or image token i to slot i."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SOFTMAX_TEMPERATURE = 100.0
"""CLIP's logit scale: scores are softmax over text tokens of 100·cos."""

DIRECT_HEADER_PULL = 0.85
"""Direct image guidance moves image token 0 this far toward the prompt header."""

SDXL_L_DIM = 768
SDXL_G_DIM = 1280

_ENCODER_HINT = {
    768: "pick the ViT-L/14 encoder for SD1.5 (and for SDXL's CLIP-L half)",
    1280: "pick the ViT-bigG/14 encoder for SDXL's CLIP-G half",
}


# --------------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class FlexParams:
    """FlexDiffuse settings; defaults are the original's UI (HEAD sandbox) defaults.

    threshold_mult / threshold_floor: weight given to slots whose score reaches the floor.
    linear_start / linear_end: weight ramp from the first to the last position of a chunk.
    clustered: weight of the tent around score peaks (1 at peaks, 0 in the valleys between them).
    max_guidance: cap on the positive side of every weight. header_max: cap on |weight| of position 0
    (applied when < 1). priority / reuse: how image tokens are assigned to text positions.
    concept_threshold: match score above which a prompt token is replaced by a concept's image token.
    compatible: reproduce the original's quirks (see the module docstring).
    """

    threshold_mult: float = 0.25
    threshold_floor: float = 0.75
    linear_start: float = 0.1
    linear_end: float = 0.5
    clustered: float = 0.15
    max_guidance: float = 0.35
    header_max: float = 0.0
    priority: str = "best_fit"
    reuse: bool = True
    concept_threshold: float = 0.9
    compatible: bool = False

    _RANGES = (
        ("threshold_mult", -1.0, 1.0),
        ("linear_start", -1.0, 1.0),
        ("linear_end", -1.0, 1.0),
        ("clustered", -0.5, 0.5),
        ("max_guidance", 0.0, 1.0),
        ("header_max", 0.0, 1.0),
        ("threshold_floor", 0.0, 1.0),
        ("concept_threshold", 0.0, 1.0),
    )

    def validate(self) -> FlexParams:
        """Raise ArgumentError for the first value outside its range; return self."""
        for name, lo, hi in self._RANGES:
            value = getattr(self, name)
            allowed = f"a number from {lo:g} to {hi:g}"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ArgumentError(name, value, allowed)
            if not lo <= float(value) <= hi:  # also rejects NaN
                raise ArgumentError(name, value, allowed)
        if self.priority not in PRIORITIES:
            raise ArgumentError("priority", self.priority, "one of " + ", ".join(repr(p) for p in PRIORITIES))
        for name in ("reuse", "compatible"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentError(name, getattr(self, name), "True or False")
        return self

    @property
    def multipliers_zero(self) -> bool:
        """True when every weight source is 0, so guidance changes nothing (concepts aside)."""
        return self.threshold_mult == 0 and self.linear_start == 0 and self.linear_end == 0 and self.clustered == 0


# --------------------------------------------------------------------------------------------------
# Helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are computed in float32; float32/float64 stay as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _cpu64(x: torch.Tensor) -> torch.Tensor:
    """Small per-slot vectors are handled on the CPU in float64 (MPS has no float64)."""
    return x.detach().to(device="cpu").to(torch.float64)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows; a zero row stays zero instead of becoming NaN."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _check_priority(priority: str) -> None:
    if priority not in PRIORITIES:
        raise ArgumentError("priority", priority, "one of " + ", ".join(repr(p) for p in PRIORITIES))


def _dim_error(image_dim: int, text_dim: int, what: str = "image tokens") -> ImgcondError:
    hint = _ENCODER_HINT.get(text_dim, f"pick a CLIP vision encoder whose projection is {text_dim}-d")
    return ImgcondError(f"{what} are {image_dim}-d but the text embedding is {text_dim}-d: {hint}")


def _as_2d(x: torch.Tensor, name: str) -> torch.Tensor:
    """Accept (N, D) or (1, N, D)."""
    if not isinstance(x, torch.Tensor):
        raise ImgcondError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise ImgcondError(f"{name} must have shape (tokens, dim) or (1, tokens, dim), got {tuple(x.shape)}")
    return x


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ImgcondError(f"{name} contain NaN or infinite values; re-encode the input (try full precision)")


def similarity_scores(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """(I, T) scores s(i, t) = softmax over t of 100·cos(img_i, txt_t), in float32 or better."""
    dtype = _compute_dtype(torch.promote_types(img.dtype, txt.dtype))
    a = _unit(img.to(dtype))
    b = _unit(txt.to(device=img.device, dtype=dtype))
    return (SOFTMAX_TEMPERATURE * (a @ b.t())).softmax(dim=-1)


# --------------------------------------------------------------------------------------------------
# 1. Mapping image tokens to text slots


def _greedy(scores: torch.Tensor, text_first: bool, compatible: bool) -> tuple[list[int], list[float]]:
    """Assign image tokens (rows) to slots (columns) without reuse, best candidates first.

    ``text_first`` orders candidates by slot, then score (descending), then image index; otherwise
    by score, then slot, then image index. Stable sorts give the deterministic tie-breaking.
    """
    n_img, n_slot = scores.shape
    by_slot = scores.t().contiguous()  # (C, I): flattening is slot-major, i.e. ties keep slot then image order
    if text_first:
        ordered = torch.sort(by_slot, dim=1, descending=True, stable=True)
        rows = ordered.indices.reshape(-1).tolist()
        vals = ordered.values.reshape(-1).tolist()
        cols = [c for c in range(n_slot) for _ in range(n_img)]
    else:
        flat = by_slot.reshape(-1)
        ordered = torch.sort(flat, descending=True, stable=True)
        perm = ordered.indices
        rows = (perm % n_img).tolist()
        cols = torch.div(perm, n_img, rounding_mode="floor").tolist()
        vals = ordered.values.tolist()

    idx = [0] * n_slot
    val = [0.0] * n_slot
    filled = [False] * n_slot
    used: set[int] = set()
    n_filled = 0
    for i, c, v in zip(rows, cols, vals, strict=True):
        # The original tests "already filled" as score > 0 (a zero score can be overwritten).
        taken = val[c] > 0 if compatible else filled[c]
        if taken or i in used:
            continue
        idx[c], val[c] = i, v
        used.add(i)
        if compatible:
            if v > 0:
                n_filled += 1
        else:
            filled[c] = True
            n_filled += 1
        if n_filled == n_slot or len(used) == n_img:
            break
    return idx, val


def map_embeddings(
    img: torch.Tensor,
    txt: torch.Tensor,
    reuse: bool = True,
    priority: str = "best_fit",
    compatible: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match image tokens to the text slots of one chunk: (idx LongTensor[T], score Tensor[T]).

    img (I, D) image tokens, txt (T, D) text tokens. Unmatched slots are (0, 0).
    compatible: slot t holds text token t+1 (slot T-1 unmatched); corrected: slot t holds text
    token t, slot 0 (header) unmatched except in "direct" priority.
    """
    _check_priority(priority)
    img = _as_2d(img, "image tokens")
    txt = _as_2d(txt, "text tokens")
    if img.shape[1] != txt.shape[1]:
        raise _dim_error(img.shape[1], txt.shape[1])
    n_img, n_txt = img.shape[0], txt.shape[0]
    if n_img == 0:
        raise ImgcondError("the guidance image produced no tokens")
    s_all = similarity_scores(img, txt)
    _check_finite(s_all, "image/text similarity scores")  # NaN or inf in either input ends up here
    out_dtype = s_all.dtype
    s_all = s_all.detach().to("cpu")

    first = 1  # text tokens 1..T-1 are candidates; the header is not
    offset = 1 if compatible else 0  # slot = text token - offset
    idx = torch.zeros(n_txt, dtype=torch.long)
    score = torch.zeros(n_txt, dtype=s_all.dtype)

    if priority == "direct":
        if compatible:
            n = min(n_img, n_txt - 1)
            slots = torch.arange(n)
            score[slots] = s_all[slots, slots + 1]
        else:
            n = min(n_img, n_txt)
            slots = torch.arange(n)
            score[slots] = s_all[slots, slots]
        idx[slots] = slots
    elif n_txt > first:
        cand = s_all[:, first:]  # (I, C), column c = text token c + 1
        slots = torch.arange(first, n_txt) - offset
        if reuse:
            best = cand.argmax(dim=0)  # first maximum: smallest image index on ties
            best_val = cand.gather(0, best.unsqueeze(0)).squeeze(0)
            if compatible:
                # All-zero column: the original keeps overwriting and ends on the last image token.
                best = torch.where(best_val > 0, best, torch.full_like(best, n_img - 1))
            idx[slots] = best
            score[slots] = best_val
        else:
            got_idx, got_val = _greedy(cand, priority == "text_order", compatible)
            idx[slots] = torch.tensor(got_idx, dtype=torch.long)
            score[slots] = torch.tensor(got_val, dtype=s_all.dtype)
    return idx.to(img.device), score.to(device=img.device, dtype=out_dtype)


# --------------------------------------------------------------------------------------------------
# 2. Weights per slot


def blend_weights(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The original's weight blend: max(a, b) if both have a non-negative maximum, a + b if only a has,
    min(a, b) if a is entirely negative."""
    if a.shape != b.shape:
        raise ImgcondError(f"cannot blend weights of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if bool(a.max() >= 0):
        if bool(b.max() >= 0):
            return torch.maximum(a, b)
        return a + b
    return torch.minimum(a, b)


def cluster_peaks(scores: torch.Tensor) -> list[tuple[int, int]]:
    """Peaks of the slot scores as runs (first, last) of adjacent peak slots.

    A peak is a slot t in 1..T-2 with s_t ≥ mean(s) and s_{t-1} ≤ s_t ≥ s_{t+1}. Adjacent peaks can only
    arise from equal scores (a plateau); they are merged into one run so no valley falls on a peak.
    """
    s = _cpu64(scores).tolist()
    n = len(s)
    if n == 0:
        return []
    avg = math.fsum(s) / n
    runs: list[tuple[int, int]] = []
    for t in range(1, n - 1):
        if s[t] >= avg and s[t - 1] <= s[t] >= s[t + 1]:
            if runs and runs[-1][1] == t - 1:
                runs[-1] = (runs[-1][0], t)
            else:
                runs.append((t, t))
    return runs


def cluster_tent(scores: torch.Tensor) -> torch.Tensor | None:
    """Tent weights (float32, unscaled): 1 on peak runs, falling linearly to 0 at the valleys.

    Valleys: slot 0, the midpoint p1 + ceil((p2 - p1) / 2) between consecutive runs (p1 = end of the
    first run, p2 = start of the next), and slot T-1. Returns None when there is no peak.
    """
    n = int(scores.shape[0])
    runs = cluster_peaks(scores)
    if not runs:
        return None
    valleys = [0]
    for (_, end1), (start2, _) in itertools.pairwise(runs):
        valleys.append(end1 + math.ceil((start2 - end1) / 2))
    if runs[-1][1] != n - 1:
        valleys.append(n - 1)

    drop = [1.0] * n  # amount subtracted from 1 at each slot (float64, as the original's slope terms)
    for k, (start, end) in enumerate(runs):
        left, right = valleys[k], valleys[k + 1] if k + 1 < len(valleys) else None
        for x in range(start, end + 1):
            drop[x] = 0.0
        d = max(start - left, 1)
        for x in range(left + 1, start):
            drop[x] = (1.0 / d) * (start - x)
        if right is not None:
            d = max(right - end, 1)
            for x in range(end + 1, right + 1):
                drop[x] = (1.0 / d) * (x - end)
    drop[0] = 1.0  # slot 0 is always a valley
    return torch.ones(n, dtype=torch.float32) - torch.tensor(drop, dtype=torch.float64).to(torch.float32)


def slot_weights(scores: torch.Tensor, params: FlexParams) -> torch.Tensor:
    """Per-slot guidance weights (float32, CPU) from the match scores of one chunk."""
    n = int(scores.shape[0])
    s = _cpu64(scores)
    w = torch.linspace(float(params.linear_start), float(params.linear_end), steps=n, dtype=torch.float32)
    if params.clustered != 0:
        tent = cluster_tent(s)
        if tent is not None:
            w = blend_weights(w, tent * float(params.clustered))
    if params.threshold_mult != 0:
        hit = s >= float(params.threshold_floor)
        th = torch.where(hit, torch.full((n,), float(params.threshold_mult)), torch.zeros(n)).to(torch.float32)
        w = blend_weights(w, th)
    if params.header_max < 1.0 and n > 0:
        h = float(w[0])
        cap = float(params.header_max)
        w = w.clone()
        w[0] = min(h, cap) if h >= 0 else max(h, -cap)
    return w


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
