"""Hires-pass latent mixing, part 1: parameters, weight schedules and the schedule plot.

Conventions and window semantics are described in ``lib_imgcond.mixing.mixer`` (the public entry point, which
re-exports everything here). Only the standard library and torch are imported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

from lib_imgcond.common.errors import ArgumentError

SCHEDULES = ("demofusion_cosine", "im_cosine", "linear", "logistic")
BLENDS = ("addition", "slerp", "norm_only")
ORDERS = ("demofusion", "iterative_mixer")

_IM_SCHEDULES = ("cosine", "im_cosine", "linear", "logistic")


# --------------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(name: str, value: object, lo: float, hi: float, *, lo_open: bool = False) -> None:
    """Raise ArgumentError unless ``value`` is a finite real in [lo, hi] (or (lo, hi] with ``lo_open``)."""
    allowed = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if not _is_number(value):
        raise ArgumentError(name, value, allowed)
    v = float(value)  # type: ignore[arg-type]
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v <= lo):
        raise ArgumentError(name, value, allowed)


def _frac_to_step(fraction: float, n: int) -> int:
    """⌊fraction·n⌋ with a small tolerance against binary rounding (0.29·100 → 29, not 28)."""
    return max(0, math.floor(fraction * n + 1e-9))


def _sigmoid(z: float) -> float:
    """Overflow-free logistic function."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _clip01(v: float) -> float:
    return 0.0 if v < 0.0 else 1.0 if v > 1.0 else v


def _check_steps(n: object, name: str = "n_steps") -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ArgumentError(name, n, "a non-negative integer")
    return n


# --------------------------------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixParams:
    """User settings of hires latent mixing. Fractions refer to the hires pass's own steps.

    schedule: one of SCHEDULES. alpha: curve exponent (DemoFusion cosine_scale_1, default 3), in (0, 100].
    start / stop / clamp: fractions; mixing is active for ⌊start·n⌋ ≤ i < min(⌊stop·n⌋, ⌊clamp·n⌋). ``stop`` may be up
    to 2 to stretch the curve past the last step. blend_min / blend_max: range of the z' weight inside the window.
    blend: one of BLENDS. normalize: after mixing, match x's per-channel mean/std to z'_i's. fresh_noise: a new ε per
    step (seeded) instead of the pass's fixed noise. order: one of ORDERS — "demofusion" (default) blends before the
    model call of step i with z'_i at the matching level σ_i (DemoFusion's skip residual); "iterative_mixer" blends
    after step i's sampler update with z'_i while x is already at σ_{i+1} (Iterative Mixing's order and its one-level
    mismatch; the last step's blend is applied to the sampler's result). rewind: after the pass, re-noise its result
    and sample again from later steps (Iterative Mixing's rewind, see rewind_ranges); rewind_min: the fraction of the
    remaining steps each rewind skips; rewind_max: the latest start, as a fraction of the steps. With rewind on,
    rewind_min must be below rewind_max.
    """

    schedule: str = "demofusion_cosine"
    alpha: float = 3.0
    start: float = 0.0
    stop: float = 1.0
    clamp: float = 1.0
    blend_min: float = 0.0
    blend_max: float = 1.0
    blend: str = "addition"
    normalize: bool = False
    fresh_noise: bool = False
    order: str = "demofusion"
    rewind: bool = False
    rewind_min: float = 0.5
    rewind_max: float = 0.8

    def validate(self) -> MixParams:
        """Raise ArgumentError naming the first invalid field; return self when all are valid."""
        if self.schedule not in SCHEDULES:
            raise ArgumentError("schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
        if self.blend not in BLENDS:
            raise ArgumentError("blend", self.blend, f"one of {', '.join(BLENDS)}")
        _check_range("alpha", self.alpha, 0.0, 100.0, lo_open=True)
        _check_range("start", self.start, 0.0, 1.0)
        _check_range("stop", self.stop, 0.0, 2.0)
        _check_range("clamp", self.clamp, 0.0, 1.0)
        _check_range("blend_min", self.blend_min, 0.0, 1.0)
        _check_range("blend_max", self.blend_max, 0.0, 1.0)
        if float(self.blend_min) > float(self.blend_max):
            raise ArgumentError("blend_min", self.blend_min, f"a number ≤ blend_max ({self.blend_max!r})")
        if not isinstance(self.normalize, bool):
            raise ArgumentError("normalize", self.normalize, "True or False")
        if not isinstance(self.fresh_noise, bool):
            raise ArgumentError("fresh_noise", self.fresh_noise, "True or False")
        if self.order not in ORDERS:
            raise ArgumentError("order", self.order, f"one of {', '.join(ORDERS)}")
        if not isinstance(self.rewind, bool):
            raise ArgumentError("rewind", self.rewind, "True or False")
        _check_rewind(self.rewind_min, self.rewind_max, check_order=self.rewind)
        return self


# --------------------------------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------------------------------


def demofusion_cf(t: float, T: float = 1000.0) -> float:
    """DemoFusion's base cosine factor ``cf = ½(1 + cos(π(T − t)/T))``: ≈1 at t = T (start), 0 at t = 0 (end)."""
    if not _is_number(T) or not float(T) > 0:
        raise ArgumentError("T", T, "a positive number")
    if not _is_number(t) or not math.isfinite(float(t)):
        raise ArgumentError("t", t, f"a number in [0, {T}]")
    return 0.5 * (1.0 + math.cos(math.pi * (float(T) - float(t)) / float(T)))


def demofusion_c1(t: float, T: float = 1000.0, alpha: float = 3.0) -> float:
    """DemoFusion skip-residual weight on the noised reference at timestep t: ``c₁ = cf^alpha``."""
    _check_range("alpha", alpha, 0.0, 100.0, lo_open=True)
    return max(demofusion_cf(t, T), 0.0) ** float(alpha)


def demofusion_c3(t: float, T: float = 1000.0, scale: float = 1.0) -> float:
    """DemoFusion Gaussian-filter factor ``c₃ = 0.99·cf^scale + 0.01`` (cosine_scale_3, default 1)."""
    _check_range("scale", scale, 0.0, 100.0, lo_open=True)
    return 0.99 * max(demofusion_cf(t, T), 0.0) ** float(scale) + 0.01


def _curve(schedule: str, i: int, stop_step: int, start_step: int, n: int, alpha: float) -> float:
    """Raw z' weight in [0, 1] of one active step (stop_step ≥ 1 is guaranteed by the caller)."""
    p = i / stop_step
    if schedule == "demofusion_cosine":
        return (0.5 * (1.0 + math.cos(math.pi * p))) ** alpha
    if schedule == "im_cosine":
        return 1.0 - math.sin(0.5 * math.pi * p) ** (2.0 * alpha)
    if schedule == "linear":
        return 1.0 - p
    # logistic, Iterative-Mixing parameterisation: k = 5α, M = n − 1, midpoint halfway between start and stop.
    m = max(n - 1, 1)
    mid = (stop_step + start_step) / 2.0 / m
    return 1.0 - _sigmoid(5.0 * alpha * (i / m - mid))


def _stop_step(schedule: str, stop: float, n: int) -> int:
    """The curve's end S (see zprime_weights): ⌊stop·n⌋, with the stop-rounds-to-0 rule per schedule."""
    if stop <= 0:
        return 0
    s = _frac_to_step(stop, n)
    if s == 0:
        return n if schedule == "linear" else 1
    return s


def zprime_weights(params: MixParams, n_steps: int) -> list[float]:
    """Weight on the noised reference z' for each hires step i = 0 … n_steps−1 (0 = pure sampler latent).

    Mixing is active only inside the window ⌊start·n⌋ ≤ i < min(S, ⌊clamp·n⌋) with S = ⌊stop·n⌋ (S = 0, i.e. no
    mixing, when stop == 0); everywhere else the weight is exactly 0.0. When 0 < stop·n < 1 (⌊stop·n⌋ = 0 although
    stop > 0), linear uses S = n, the plain ramp of Iterative Mixing's linear (its ``stop or steps``); the other
    schedules use S = 1 (only step 0 is mixed; the original's cosine gives a NaN there). Inside the window, with
    progress p = i/S:

    * demofusion_cosine: ``((1 + cos πp)/2)^α`` — DemoFusion's c₁ with step progress instead of (1000 − t)/1000.
    * im_cosine: ``1 − sin^{2α}(πp/2)`` — Iterative Mixing's cosine (its denoised weight is sin^{2α}).
    * linear: ``1 − p``.
    * logistic: ``1 − σ(5α(i/M − mid))`` with M = n − 1, mid = (S + start_step)/2/M (Iterative Mixing's curve).

    then squeezed: ``blend_min + w·(blend_max − blend_min)``. Unlike Iterative Mixing, ``start`` is honoured by every
    schedule and means "no mixing before this step" (Iterative Mixing's linear/logistic use full z' before start and
    its cosine ignores start).
    """
    params.validate()
    n = _check_steps(n_steps)
    alpha = float(params.alpha)
    start_step = _frac_to_step(float(params.start), n)
    stop_step = _stop_step(params.schedule, float(params.stop), n)
    end = min(stop_step, _frac_to_step(float(params.clamp), n))
    lo, hi = float(params.blend_min), float(params.blend_max)
    weights: list[float] = []
    for i in range(n):
        if i < start_step or i >= end:
            weights.append(0.0)
            continue
        w = _clip01(_curve(params.schedule, i, stop_step, start_step, n, alpha))
        weights.append(_clip01(lo + w * (hi - lo)))
    return weights


def im_denoised_weights(
    n: int,
    alpha: float = 2.4,
    start: float = 0.0,
    stop: float = 1.0,
    clamp: float = 1.0,
    schedule: str = "cosine",
    blend_min: float = 0.0,
    blend_max: float = 1.0,
) -> list[float]:
    """Iterative Mixing's original schedule: the weight on the DENOISED latent per step (reference values only).

    schedule: "cosine" (alias "im_cosine"), "linear" or "logistic". Reproduces the original's quirks (cosine ignores
    ``start``; linear/logistic give 0 before start; clamped steps become 1 before the squeeze, hence ``blend_max``
    after it). A stop that rounds to 0 steps (stop·n < 1, stop = 0 included) gives, like the original, the plain ramp
    ``i/n`` for linear (its ``stop or steps``). Two fixes from the seeds' crash list: there cosine is treated as a
    1-step curve (the original's c₀ is NaN; ours is its limit 0, then 1) and logistic as "no stop" (M = n − 1; the
    original raises NameError); and the logistic is overflow-free.
    """
    n = _check_steps(n, "n")
    if schedule not in _IM_SCHEDULES:
        raise ArgumentError("schedule", schedule, f"one of {', '.join(_IM_SCHEDULES)}")
    _check_range("alpha", alpha, 0.0, 100.0, lo_open=True)
    _check_range("start", start, 0.0, 1.0)
    _check_range("stop", stop, 0.0, 2.0)
    _check_range("clamp", clamp, 0.0, 1.0)
    _check_range("blend_min", blend_min, 0.0, 1.0)
    _check_range("blend_max", blend_max, 0.0, 1.0)
    a = float(alpha)
    start_step = _frac_to_step(float(start), n)
    stop_step = _frac_to_step(float(stop), n)
    c: list[float] = []
    if schedule in ("cosine", "im_cosine", "linear"):
        s = stop_step or (n if schedule == "linear" else 1)
        for i in range(n):
            if i > s:
                c.append(1.0)
            elif schedule == "linear":
                c.append(0.0 if i < start_step else i / s)
            else:
                c.append(math.sin(0.5 * math.pi * i / s) ** (2.0 * a))
    else:
        m = max(n - 1, 1)
        s = stop_step if stop_step > 0 else m
        mid = (s + start_step) / 2.0 / m
        for i in range(n):
            if i / m > s / m:
                c.append(1.0)
            elif i / m < start_step / m:
                c.append(0.0)
            else:
                c.append(_sigmoid(5.0 * a * (i / m - mid)))
    clamp_step = _frac_to_step(float(clamp), n)
    c = [1.0 if i >= clamp_step else v for i, v in enumerate(c)]
    lo, hi = float(blend_min), float(blend_max)
    return [lo + v * (hi - lo) for v in c]


def _check_rewind(rewind_min: object, rewind_max: object, *, check_order: bool = True) -> None:
    _check_range("rewind_min", rewind_min, 0.01, 0.99)
    _check_range("rewind_max", rewind_max, 0.01, 1.0)
    if check_order and float(rewind_min) >= float(rewind_max):  # type: ignore[arg-type]
        raise ArgumentError("rewind_min", rewind_min, f"a number < rewind_max ({rewind_max!r}) when rewind is on")


def rewind_ranges(n_steps: int, rewind_min: float = 0.5, rewind_max: float = 0.8) -> list[tuple[int, int]]:
    """Iterative Mixing's rewind: the step ranges ``(start, n)`` sampled one after the other, the first ``(0, n)``.

    Exact rule (the original's ``geometric_ranges(0, n, rewind_min, max_start=int(n·rewind_max))``): from
    ``start = 0``, the next start is ``start' = start + ⌊(n − start)·rewind_min⌋``; it is used while
    ``start < start' < n`` and ``start' ≤ ⌊n·rewind_max⌋``; the first start that fails ends the list. With the
    defaults each rewind goes back half as far as the previous one: 0, 50 %, 75 %, … of the steps, up to 80 %. E.g.
    n = 20 → (0, 20), (10, 20), (15, 20); n = 30 → (0, 30), (15, 30), (22, 30). ⌊·⌋ uses the same 1e-9 tolerance
    as the schedules (so 0.29·100 → 29), the only difference from the original's ``int()``.
    Raises ArgumentError naming ``rewind_min`` / ``rewind_max`` when out of range or when rewind_min ≥ rewind_max.
    """
    n = _check_steps(n_steps)
    _check_rewind(rewind_min, rewind_max)
    ranges = [(0, n)]
    max_start = _frac_to_step(float(rewind_max), n)
    start = 0
    while True:
        nxt = start + _frac_to_step(float(rewind_min), n - start)
        if nxt >= n or nxt <= start or nxt > max_start:
            return ranges
        ranges.append((nxt, n))
        start = nxt


# --------------------------------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------------------------------


def schedule_svg(weights: Sequence[float], width: int = 320, height: int = 120, title: str = "") -> str:
    """Small inline SVG line plot of z' weight (y, 0…1) per hires step (x, 1…n). Deterministic, dependency-free."""
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or isinstance(v, bool) or not 80 <= v <= 4000:
            raise ArgumentError(name, v, "an integer in [80, 4000]")
    ws = [float(v) for v in weights]
    if not all(math.isfinite(v) for v in ws):
        raise ArgumentError("weights", [v for v in ws if not math.isfinite(v)][:3], "finite numbers in [0, 1]")
    ws = [_clip01(v) for v in ws]
    n = len(ws)
    left, right, bottom = 30, 10, 28
    top = 20 if title else 10
    pw, ph = width - left - right, height - top - bottom
    x0, y0, y1 = left, top + ph, top

    def px(i: int) -> float:
        return x0 + (pw * i / (n - 1) if n > 1 else pw / 2)

    def py(v: float) -> float:
        return y0 - ph * v

    label = title or "z′ weight per hires step"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label, {chr(34): "&quot;"})}" '
        'font-family="sans-serif" font-size="10">',
        f"<title>{escape(label)}</title>",
        f'<line x1="{x0}" y1="{y0}" x2="{x0 + pw}" y2="{y0}" stroke="currentColor" stroke-width="1"/>',
        f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="currentColor" stroke-width="1"/>',
        f'<line x1="{x0}" y1="{y1}" x2="{x0 + pw}" y2="{y1}" stroke="currentColor" stroke-width="0.5" '
        'stroke-dasharray="3,3" opacity="0.5"/>',
        f'<text x="{x0 - 4}" y="{y0 + 3}" text-anchor="end" fill="currentColor">0</text>',
        f'<text x="{x0 - 4}" y="{y1 + 3}" text-anchor="end" fill="currentColor">1</text>',
        f'<text x="{x0 + pw / 2:.1f}" y="{height - 4}" text-anchor="middle" fill="currentColor">hires step</text>',
    ]
    if title:
        parts.append(
            f'<text x="{x0 + pw / 2:.1f}" y="13" text-anchor="middle" fill="currentColor">{escape(title)}</text>'
        )
    if n:
        parts.append(f'<text x="{px(0):.1f}" y="{y0 + 12}" text-anchor="middle" fill="currentColor">1</text>')
        if n > 1:
            parts.append(f'<text x="{px(n - 1):.1f}" y="{y0 + 12}" text-anchor="middle" fill="currentColor">{n}</text>')
        pts = " ".join(f"{px(i):.1f},{py(v):.1f}" for i, v in enumerate(ws))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="#e8590c" stroke-width="1.5"/>')
        if n <= 60:
            parts.extend(
                f'<circle cx="{px(i):.1f}" cy="{py(v):.1f}" r="1.8" fill="#e8590c"/>' for i, v in enumerate(ws)
            )
    parts.append("</svg>")
    return "".join(parts)
