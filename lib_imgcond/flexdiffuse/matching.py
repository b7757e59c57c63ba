"""FlexDiffuse steps 1 and 2: mapping image tokens to text slots, and the weight of each slot.

The technique and its two modes are described in :mod:`lib_imgcond.flexdiffuse.guidance`.
"""

from __future__ import annotations

import itertools
import math

import torch

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.flexdiffuse.params import (
    FlexParams,
    _as_2d,
    _check_finite,
    _check_priority,
    _cpu64,
    _dim_error,
    similarity_scores,
)

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
