"""Shared inputs for the hires-mixing unit tests (tests/unit/test_mixing*.py)."""

from __future__ import annotations

import torch


def vec(*values: float) -> torch.Tensor:
    """A single-item batch (1, len, 1, 1) so per-item blends see exactly this vector."""
    return torch.tensor(values, dtype=torch.float64).reshape(1, -1, 1, 1)


def sigmas(n: int = 10) -> torch.Tensor:
    s = torch.linspace(10.0, 0.5, n, dtype=torch.float64)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def latents(seed: int = 0, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    z_up = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    return z_up, noise
