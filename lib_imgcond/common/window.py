"""Step windows: apply an image conditioning only while the sampler is inside a fraction of the noise schedule.

A window is `(start, end)` in [0, 1], fractions of the denoising as the host's `percent_to_sigma` measures them
(0 = the highest noise level, 1 = the lowest). It is tested per model evaluation against that evaluation's own sigma,
so it is right for any sampler (second-order ones evaluate between steps), for img2img and for the hires pass.
`start == end` is an empty window: the conditioning never applies (identical to off).
"""

from __future__ import annotations

from collections.abc import Callable

from lib_imgcond.common.errors import ArgumentError

_REL_TOL = 1e-6  # sigmas from percent_to_sigma and from the sampler's schedule may differ in the last bits


def check(start: float, end: float, prefix: str) -> None:
    """Raise ArgumentError naming `<prefix>.end` unless 0 <= start <= end <= 1."""
    if not 0.0 <= start <= 1.0:
        raise ArgumentError(f"{prefix}.start", start, "a number in [0, 1]")
    if not 0.0 <= end <= 1.0 or end < start:
        raise ArgumentError(f"{prefix}.end", end, f"a number in [start ({start}), 1]")


def is_full(start: float, end: float) -> bool:
    return start <= 0.0 and end >= 1.0


def is_empty(start: float, end: float) -> bool:
    return start >= end


def sigma_test(start: float, end: float, percent_to_sigma: Callable[[float], float] | None) -> Callable[[float], bool]:
    """`inside(sigma)` for the window: True while `percent_to_sigma(end) <= sigma <= percent_to_sigma(start)`
    (with a relative tolerance of 1e-6). A full window is always inside, an empty one never; without a
    `percent_to_sigma` (a model without a predictor) only the full window is known, and it is inside always."""
    if is_full(start, end):
        return lambda _sigma: True
    if is_empty(start, end):
        return lambda _sigma: False
    if percent_to_sigma is None:
        return lambda _sigma: True
    hi = float(percent_to_sigma(start))
    lo = float(percent_to_sigma(end))
    lo_bound = lo - _REL_TOL * max(abs(lo), 1.0)
    hi_bound = hi + _REL_TOL * max(abs(hi), 1.0)

    def inside(sigma: float) -> bool:
        return lo_bound <= float(sigma) <= hi_bound

    return inside
