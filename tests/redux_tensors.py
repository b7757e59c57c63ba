"""Redux test helpers: small random tensors and token grids for the unit tests of lib_imgcond.redux."""

from __future__ import annotations

import math

import torch

D = 6


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tokens(b: int = 1, n: int = 729, seed: int = 0) -> torch.Tensor:
    return rand(b, n, D, seed=seed)


def grid_of(t: torch.Tensor) -> torch.Tensor:
    side = math.isqrt(t.shape[1])
    return t.reshape(t.shape[0], side, side, -1)
