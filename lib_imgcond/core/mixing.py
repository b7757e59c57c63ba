"""Hires-pass latent mixing: Iterative Mixing / DemoFusion "skip residual" schedules, blends and the per-step mixer.

Conventions used throughout this module
---------------------------------------
* ``w`` is always the weight on the **noised reference** ``z'_i = noise_scaling(σ_i, ε, z_up)``; ``1 − w`` is the
  weight on the sampler's own latent ``x``. ``w = 0`` means "no mixing" and leaves ``x`` untouched bitwise.
  (Iterative Mixing's code uses the opposite convention: its ``c`` weights the denoised latent. ``im_denoised_weights``
  reproduces that convention for reference; everything else here speaks ``w``.)
* Steps are the sampler steps of the hires pass, ``i = 0 … n−1``, one per entry of the sigma schedule minus the final 0.
* Mixing happens DemoFusion-style: before the model evaluation of step ``i``, at the matching noise level σ_i
  (Iterative Mixing blends after the update with a one-level mismatch; we do not reproduce that).

Window semantics (applies to every schedule)
--------------------------------------------
With ``a = ⌊start·n⌋``, ``S = max(1, ⌊stop·n⌋)`` (``S = 0`` when ``stop == 0``) and ``C = ⌊clamp·n⌋``, mixing is
active for ``a ≤ i < min(S, C)``. Outside that window the weight is exactly ``0.0`` (not ``blend_min``). Inside it the
schedule's curve value ``w ∈ [0, 1]`` is squeezed into ``[blend_min, blend_max]``: ``w' = blend_min + w·(blend_max −
blend_min)``; ``blend_max = 0`` therefore gives all-zero weights. The curves use the progress ``p = i / S`` so that
``stop > 1`` stretches them beyond the last step. ``⌊f·n⌋`` is computed with a 1e-9 tolerance so that e.g.
``0.29·100`` gives 29 (plain ``int()`` gives 28).

Only the standard library, torch and numpy are imported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

import torch

from lib_imgcond.core.errors import ArgumentError, ImgcondError

__all__ = [
    "BLENDS",
    "SCHEDULES",
    "HiresMixer",
    "MixParams",
    "blend",
    "demofusion_c1",
    "demofusion_c3",
    "demofusion_cf",
    "im_denoised_weights",
    "match_mean_std",
    "noise_scaling",
    "schedule_svg",
    "zprime_weights",
]

SCHEDULES = ("demofusion_cosine", "im_cosine", "linear", "logistic")
BLENDS = ("addition", "slerp", "norm_only")

_IM_SCHEDULES = ("cosine", "im_cosine", "linear", "logistic")
_SIGMA_RTOL = 1e-4
_SLERP_MIN_SIN = 1e-6
_NORM_EPS = 1e-12


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


def _as_weight(w: object) -> float:
    """Python float from a float, int or one-element tensor; the same number gives the same result either way."""
    if isinstance(w, torch.Tensor):
        if w.numel() != 1:
            raise ArgumentError("w", tuple(w.shape), "a scalar or a one-element tensor")
        v = float(w.detach().reshape(()).item())
    elif _is_number(w):
        v = float(w)  # type: ignore[arg-type]
    else:
        raise ArgumentError("w", w, "a number in [0, 1]")
    if not math.isfinite(v) or v < 0.0 or v > 1.0:
        raise ArgumentError("w", v, "a number in [0, 1]")
    return v


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types and float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, …) → (B, N); a 1-D tensor is one item."""
    return t.reshape(1, -1) if t.ndim <= 1 else t.reshape(t.shape[0], -1)


def _match_batch(ref: torch.Tensor, x: torch.Tensor, ref_name: str) -> torch.Tensor:
    """Return ``ref`` broadcast to ``x``'s shape (a batch of 1 is repeated); raise on any other mismatch."""
    if ref.shape == x.shape:
        return ref
    if ref.ndim == x.ndim and ref.ndim >= 1 and ref.shape[0] == 1 and ref.shape[1:] == x.shape[1:]:
        return ref.expand_as(x)
    raise ImgcondError(
        f"{ref_name} has shape {tuple(ref.shape)} but the latent has shape {tuple(x.shape)}; "
        "they must match (or the reference must have batch size 1)"
    )


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
    step (seeded) instead of the pass's fixed noise.
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


def zprime_weights(params: MixParams, n_steps: int) -> list[float]:
    """Weight on the noised reference z' for each hires step i = 0 … n_steps−1 (0 = pure sampler latent).

    Mixing is active only inside the window ⌊start·n⌋ ≤ i < min(S, ⌊clamp·n⌋) with S = max(1, ⌊stop·n⌋)
    (S = 0, i.e. no mixing, when stop == 0); everywhere else the weight is exactly 0.0. Inside the window, with
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
    stop_step = max(1, _frac_to_step(float(params.stop), n)) if float(params.stop) > 0 else 0
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
    after it) with two fixes from the seeds' crash list: a stop that rounds to 0 steps is treated as 1 step for
    cosine/linear (no NaN) and as "no stop" (M = n − 1) for logistic (no NameError), and the logistic is overflow-free.
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
        s = max(stop_step, 1)
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


# --------------------------------------------------------------------------------------------------------------------
# tensor operations
# --------------------------------------------------------------------------------------------------------------------


def blend(name: str, zprime: torch.Tensor, x: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """Mix the noised reference ``zprime`` into ``x`` with z' weight ``w``; returns a new tensor shaped/typed like x.

    Per batch item over the flattened C·H·W (a 1-D tensor is a single item); ``zprime`` may have batch size 1.
    With l1 = z', l2 = x and the Iterative-Mixing denoised weight c = 1 − w:

    * addition: ``(1 − w)·x + w·z'``.
    * slerp: ``sin(wω)/sin ω · z' + sin((1 − w)ω)/sin ω · x``, ω the angle between z' and x (magnitudes interpolate
      too). Parallel / anti-parallel vectors (sin ω < 1e-6) and zero vectors fall back to addition, the ω → 0 limit.
    * norm_only: ``z' + (1 − w)·(‖z'‖·x/‖x‖ − z')``: x's direction with z''s magnitude, moved toward z' by w. A zero
      x falls back to addition. Note the limit w → 0 is x rescaled to ‖z'‖, not x itself.

    ``w == 0`` returns a clone of x and ``w == 1`` a copy of z' (cast to x's dtype) for every blend, so weight 0
    always means "unchanged". w may be a float or a one-element tensor (read as a Python float; the same number gives
    bitwise-identical results). Arithmetic runs in float32 (float64 for float64 inputs).
    """
    if name not in BLENDS:
        raise ArgumentError("blend", name, f"one of {', '.join(BLENDS)}")
    wf = _as_weight(w)
    zprime = _match_batch(zprime.to(device=x.device), x, "zprime")
    if wf == 0.0:
        return x.clone()
    if wf == 1.0:
        return zprime.to(dtype=x.dtype, copy=True).contiguous()
    cd = _compute_dtype(x.dtype)
    l1 = _flat(zprime.to(cd))
    l2 = _flat(x.to(cd))
    if name == "addition":
        out = l2 * (1.0 - wf) + l1 * wf
        return out.reshape(x.shape).to(x.dtype)

    # Norms and angles in float64 for robustness; coefficients are cast back to the compute dtype.
    d1 = l1.double()
    d2 = l2.double()
    n1 = d1.norm(dim=1)
    n2 = d2.norm(dim=1)
    lin_a = torch.full_like(n1, wf)  # coefficient on z'
    lin_b = torch.full_like(n1, 1.0 - wf)  # coefficient on x
    if name == "slerp":
        ok = (n1 > _NORM_EPS) & (n2 > _NORM_EPS)
        u1 = d1 / n1.clamp_min(_NORM_EPS)[:, None]
        u2 = d2 / n2.clamp_min(_NORM_EPS)[:, None]
        # ω = 2·atan2(‖û1 − û2‖, ‖û1 + û2‖): accurate for tiny and near-π angles, no acos clamping needed.
        omega = 2.0 * torch.atan2((u1 - u2).norm(dim=1), (u1 + u2).norm(dim=1))
        sin_o = torch.sin(omega)
        ok = ok & (sin_o > _SLERP_MIN_SIN)
        safe = torch.where(ok, sin_o, torch.ones_like(sin_o))
        a = torch.where(ok, torch.sin(wf * omega) / safe, lin_a)
        b = torch.where(ok, torch.sin((1.0 - wf) * omega) / safe, lin_b)
        out = l1 * a.to(cd)[:, None] + l2 * b.to(cd)[:, None]
    else:  # norm_only
        c = 1.0 - wf
        ok = n2 > _NORM_EPS
        scale = torch.where(ok, n1 / n2.clamp_min(_NORM_EPS), torch.zeros_like(n1))
        # z' + c(s·x − z') = (1 − c)·z' + c·s·x; fall back to addition where x is a zero vector.
        a = torch.where(ok, torch.full_like(n1, 1.0 - c), lin_a)
        b = torch.where(ok, c * scale, lin_b)
        out = l1 * a.to(cd)[:, None] + l2 * b.to(cd)[:, None]
    return out.reshape(x.shape).to(x.dtype)


def match_mean_std(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Return x with each (batch item, channel)'s mean/std matched to ref's; tensors (B, C, …), ref may have B = 1.

    Statistics are population (biased) over the spatial dims, so a 1×1 latent is fine. A channel of x whose std is
    ≤ eps (e.g. constant) is not rescaled: its centred values are kept and only the mean is moved. NaN-free.
    """
    if x.ndim < 3:
        raise ImgcondError(f"match_mean_std needs tensors shaped (B, C, H, W); got x with shape {tuple(x.shape)}")
    if ref.ndim != x.ndim or ref.shape[1] != x.shape[1] or ref.shape[0] not in (1, x.shape[0]):
        raise ImgcondError(
            f"match_mean_std: ref has shape {tuple(ref.shape)}, x has shape {tuple(x.shape)}; "
            "channel counts must match and ref's batch must be 1 or x's"
        )
    cd = _compute_dtype(x.dtype)
    dims = tuple(range(2, x.ndim))
    xc = x.to(cd)
    rc = ref.to(device=x.device, dtype=cd)
    mx = xc.mean(dim=dims, keepdim=True)
    sx = xc.std(dim=dims, keepdim=True, correction=0)
    mr = rc.mean(dim=dims, keepdim=True)
    sr = rc.std(dim=dims, keepdim=True, correction=0)
    scale = torch.where(sx > eps, sr / sx.clamp_min(eps), torch.ones_like(sx))
    return ((xc - mx) * scale + mr).to(x.dtype)


def noise_scaling(
    sigma: float | torch.Tensor, noise: torch.Tensor, latent: torch.Tensor, flow: bool = False
) -> torch.Tensor:
    """Noised latent at level σ as Forge's predictor builds it.

    eps / v-prediction: ``latent + σ·noise``; flow (Flux, ``flow=True``): ``σ·noise + (1 − σ)·latent``.
    sigma: a number, a one-element tensor or a (B,) tensor (broadcast over the remaining dims).
    """
    if isinstance(sigma, torch.Tensor):
        s = sigma.to(device=latent.device, dtype=_compute_dtype(latent.dtype))
        s = s.reshape(()) if s.numel() == 1 else s.reshape((s.shape[0],) + (1,) * (latent.ndim - 1))
    elif _is_number(sigma):
        s = float(sigma)
    else:
        raise ArgumentError("sigma", sigma, "a number or a tensor")
    noise = noise.to(device=latent.device)
    out = noise * s + latent * (1.0 - s) if flow else latent + noise * s
    return out.to(latent.dtype)


# --------------------------------------------------------------------------------------------------------------------
# the per-step mixer
# --------------------------------------------------------------------------------------------------------------------


class HiresMixer:
    """Mixes the noised reference into the sampler state once per hires step. Build one per hires pass.

    Args:
        params: MixParams (validated here).
        sigmas: the (n+1,) schedule the sampler actually uses, final 0 included (n = hires steps).
        z_up: the upscaled first-pass latent (B, C, H, W) in model space (batch 1 is broadcast).
        noise: the pass's fixed noise ε, same shape as z_up (may be None with fresh_noise).
        flow: True for flow models (Flux): z' = σε + (1 − σ)z_up, else z_up + σε.
        generator_seed: base seed for fresh_noise (step i uses a CPU torch.Generator seeded generator_seed + i).
        substep_repeats_sigma: set True for samplers (Heun) whose 2nd-order sub-evaluation of step i−1 happens at
            exactly σ_i; then step i ≥ 1 is mixed at its second evaluation at σ_i (the real state) instead of the
            first (the predictor's temporary). Leave False for Euler, Euler a, DPM++ 2M, LMS, DPM2, DPM++ 2S/SDE, ….

    Step detection: ``mix_`` is called on every model evaluation. A sigma matches step i if it lies within 1e-4
    (relative) of σ_i (the final 0 never matches). Each step is handled at most once and only in increasing order:
    the first evaluation that matches a step later than the last handled one handles it; repeats and earlier steps
    are ignored. Sub-evaluations at off-schedule sigmas (DPM2, DPM++ 2S, SDE midpoints) never match.
    Remaining ambiguity: from sigmas alone, a Heun sub-evaluation at σ_{i+1} is indistinguishable from step i+1's
    own evaluation, so without ``substep_repeats_sigma`` Heun mixes step i+1 into the predictor's temporary x_2 and
    then ignores the real evaluation; Euler with s_churn > 0 evaluates at σ̂ ≠ σ_i and is never mixed.

    Attributes: ``weights`` (list of z' weights, len n), ``n_steps``, ``sigmas`` (list of floats),
    ``handled_steps`` (steps consumed, in order) and ``mixed_steps`` (those where x was actually changed).
    """

    def __init__(
        self,
        params: MixParams,
        sigmas: torch.Tensor | Sequence[float],
        z_up: torch.Tensor,
        noise: torch.Tensor | None,
        flow: bool = False,
        generator_seed: int | None = None,
        *,
        substep_repeats_sigma: bool = False,
    ):
        self.params = params.validate()
        if isinstance(sigmas, torch.Tensor):
            sig = [float(v) for v in sigmas.detach().double().cpu().reshape(-1).tolist()]
        else:
            sig = [float(v) for v in sigmas]
        if len(sig) < 2 or not all(math.isfinite(v) and v >= 0 for v in sig):
            raise ArgumentError("sigmas", sig[:8], "at least 2 finite, non-negative sigmas (n steps + final 0)")
        if not isinstance(z_up, torch.Tensor) or z_up.ndim < 3:
            raise ImgcondError("HiresMixer needs z_up as a latent tensor shaped (B, C, H, W)")
        if noise is None:
            if not params.fresh_noise:
                raise ArgumentError("noise", None, "a tensor shaped like z_up (None only with fresh_noise)")
        elif tuple(noise.shape) != tuple(z_up.shape):
            raise ImgcondError(
                f"HiresMixer: noise has shape {tuple(noise.shape)} but z_up has shape {tuple(z_up.shape)}"
            )
        if params.fresh_noise and (not isinstance(generator_seed, int) or isinstance(generator_seed, bool)):
            raise ArgumentError("generator_seed", generator_seed, "an integer seed when fresh_noise is on")
        self.sigmas: list[float] = sig
        self.n_steps: int = len(sig) - 1
        self.weights: list[float] = zprime_weights(params, self.n_steps)
        self.flow = bool(flow)
        self.generator_seed = generator_seed
        self.substep_repeats_sigma = bool(substep_repeats_sigma)
        self._z_up = z_up.detach()
        self._noise = None if noise is None else noise.detach()
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget which steps were handled (e.g. to reuse the mixer for an identical pass)."""
        self.handled_steps: list[int] = []
        self.mixed_steps: list[int] = []
        self._seen: dict[int, int] = {}

    @staticmethod
    def _sigma_value(sigma: float | torch.Tensor) -> float | None:
        if isinstance(sigma, torch.Tensor):
            if sigma.numel() == 0:
                return None
            return float(sigma.detach().reshape(-1)[0].item())
        if _is_number(sigma):
            return float(sigma)
        raise ArgumentError("sigma", sigma, "a number or a tensor")

    def _candidates(self, sigma: float | torch.Tensor) -> list[int]:
        """All schedule steps (0 … n−1) whose sigma matches within the relative tolerance, ascending."""
        s = self._sigma_value(sigma)
        if s is None or not math.isfinite(s):
            return []
        out = []
        for j in range(self.n_steps):
            ref = self.sigmas[j]
            tol = _SIGMA_RTOL * max(abs(ref), abs(s))
            if ref > 0 and abs(s - ref) <= tol:
                out.append(j)
        return out

    def step_index(self, sigma: float | torch.Tensor) -> int | None:
        """Schedule step whose sigma is nearest to ``sigma`` within 1e-4 relative, or None (sub-step / final 0)."""
        cands = self._candidates(sigma)
        if not cands:
            return None
        s = self._sigma_value(sigma)
        assert s is not None
        return min(cands, key=lambda j: (abs(self.sigmas[j] - s), j))

    def _reference(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (device, dtype)
        if key not in self._cache:
            z = self._z_up.to(device=device, dtype=dtype)
            e = None if self._noise is None else self._noise.to(device=device, dtype=dtype)
            self._cache[key] = (z, e)
        return self._cache[key]

    def zprime(self, i: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The noised reference z'_i = noise_scaling(σ_i, ε_i, z_up) for step i."""
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.n_steps:
            raise ArgumentError("i", i, f"a step index in [0, {self.n_steps - 1}]")
        device = torch.device(device)
        z, e = self._reference(device, dtype)
        if self.params.fresh_noise:
            g = torch.Generator(device="cpu")
            g.manual_seed((int(self.generator_seed) + i) % (1 << 63))  # type: ignore[arg-type]
            e = torch.randn(tuple(self._z_up.shape), generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        assert e is not None
        return noise_scaling(self.sigmas[i], e, z, self.flow)

    def _pick_step(self, sigma: float | torch.Tensor) -> int | None:
        last = self.handled_steps[-1] if self.handled_steps else -1
        for j in self._candidates(sigma):
            if j <= last:
                continue
            if self.substep_repeats_sigma and j >= 1:
                self._seen[j] = self._seen.get(j, 0) + 1
                if self._seen[j] < 2:
                    return None  # first evaluation at σ_j is the previous step's predictor sub-step
            return j
        return None

    def mix_(self, x: torch.Tensor, sigma: float | torch.Tensor) -> bool:
        """Mix x IN PLACE at the first evaluation of a not-yet-handled step; True when x was changed.

        x ← blend(params.blend, z'_i, x, w_i); with normalize, x's per-channel mean/std are then matched to z'_i's.
        Returns False (x untouched bitwise) for sub-steps, repeats, earlier steps and steps with w_i == 0
        (those are still recorded as handled).
        """
        i = self._pick_step(sigma)
        if i is None:
            return False
        self.handled_steps.append(i)
        w = self.weights[i]
        if w == 0.0:
            return False
        with torch.no_grad():
            cd = _compute_dtype(x.dtype)
            zp = _match_batch(self.zprime(i, x.device, cd), x, "z_up")
            mixed = blend(self.params.blend, zp, x.to(cd), w)
            if self.params.normalize:
                mixed = match_mean_std(mixed, zp)
            x.copy_(mixed.to(x.dtype))
        self.mixed_steps.append(i)
        return True


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
