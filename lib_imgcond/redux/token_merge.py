"""Redux token merging ("automerge" of ComfyUI_AdvancedReduxControl, corrected).

Tokens are scanned in raster order. A run grows while the next token's cosine similarity to the run's mean is at
least ``threshold``; otherwise the run is closed and emitted as the mean of its tokens, and the next token starts a
new run. Large areas of similar content thus shrink to a few tokens while the tokens that differ stay.

The original's helper has three defects this one does not copy: the first token is emitted once on its own and
once more as part of the mean of its run; a new run's mean leaves out the token that started it; and the last run
is never emitted (so the content at the end of the grid is lost). It also stacks the per-image results, which
crashes when two images of a batch merge to different lengths: here every image is merged on its own and the
result is a list with one (N_b, D) tensor per batch item.

Similarities are computed in float64 with a tolerance of 1e-6, so a threshold of 1 merges exactly the tokens that
point the same way (identical tokens included, which float rounding would otherwise split). A zero token has no
direction: its cosine to a non-zero token counts as 0, to another zero token as 1.
"""

from __future__ import annotations

import math

import torch

from lib_imgcond.common.errors import ArgumentError

__all__ = ["automerge", "merge_runs", "merged_count"]

_TOLERANCE = 1e-6


def _check(tokens: torch.Tensor, threshold: float) -> float:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ArgumentError("tokens", shape, "a (B, N, D) tensor with one image per batch row")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ArgumentError("threshold", threshold, "a number from -1 to 1")
    if not -1.0 <= threshold <= 1.0:
        raise ArgumentError("threshold", threshold, "a number from -1 to 1")
    return float(threshold)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(a @ b) / (na * nb)


def merge_runs(tokens: torch.Tensor, threshold: float) -> list[list[tuple[int, int]]]:
    """The runs ``[start, end)`` of every batch item of (B, N, D) ``tokens`` that :func:`automerge` averages."""
    threshold = _check(tokens, threshold)
    out = []
    for row in tokens.detach().to(device="cpu", dtype=torch.float64):
        runs: list[tuple[int, int]] = []
        if row.shape[0]:
            start, total = 0, row[0].clone()
            for i in range(1, row.shape[0]):
                if _cosine(row[i], total) >= threshold - _TOLERANCE:  # the sum points where the mean does
                    total += row[i]
                else:
                    runs.append((start, i))
                    start, total = i, row[i].clone()
            runs.append((start, row.shape[0]))
        out.append(runs)
    return out


def automerge(tokens: torch.Tensor, threshold: float) -> list[torch.Tensor]:
    """Merge runs of similar tokens into their mean: (B, N, D) → one (N_b, D) tensor per batch item, N_b ≤ N.

    Means are taken in float32 (or the tokens' dtype if wider) and returned in the tokens' dtype and device.
    """
    out = []
    for row, runs in zip(tokens, merge_runs(tokens, threshold), strict=True):
        if not runs:
            out.append(row[:0])
            continue
        wide = row.to(torch.promote_types(row.dtype, torch.float32))
        out.append(torch.stack([wide[a:b].mean(dim=0) for a, b in runs]).to(row.dtype))
    return out


def merged_count(tokens: torch.Tensor, threshold: float) -> list[int]:
    """How many tokens :func:`automerge` leaves for each batch item."""
    return [len(runs) for runs in merge_runs(tokens, threshold)]
