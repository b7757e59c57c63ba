"""Hires-pass latent mixing, part 2: tensor operations (blends, mean/std matching, noise scaling).

``w`` is the weight on the noised reference ``z'`` (see ``lib_imgcond.mixing.mixer``). Only torch is imported.
"""

from __future__ import annotations

import math

import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.mixing.schedules import BLENDS, _is_number

_SLERP_MIN_SIN = 1e-6
_NORM_EPS = 1e-12


# --------------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------------


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
# tensor operations
# --------------------------------------------------------------------------------------------------------------------


def blend(name: str, zprime: torch.Tensor, x: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """Mix the noised reference ``zprime`` into ``x`` with z' weight ``w``; returns a new tensor shaped/typed like x.

    Per batch item over the flattened C·H·W (a 1-D tensor is a single item); ``zprime`` may have batch size 1.
    With l1 = z', l2 = x and the Iterative-Mixing denoised weight c = 1 − w:

    * addition: ``(1 − w)·x + w·z'``.
    * slerp: ``sin(wω)/sin ω · z' + sin((1 − w)ω)/sin ω · x``, ω the angle between z' and x (magnitudes interpolate
      too). Parallel / anti-parallel vectors (sin ω < 1e-6) fall back to addition, the ω → 0 limit.
      **A zero vector** (norm ≤ 1e-12) takes ω = π/2, so ``slerp(0, x) = cos(wπ/2)·x`` and
      ``slerp(z', 0) = sin(wπ/2)·z'`` (0.7071·x at w = ½). Why: ω is undefined there, and approaching 0 along a
      direction at angle θ to the other vector gives the θ-dependent limit ``sin((1 − w)θ)/sin θ · x``, so there is
      no direction-free limit and one direction must be chosen. θ = π/2 is the sound choice: (1) ⟨0, x⟩ = 0, the
      zero vector is orthogonal to every vector, and π/2 is the only angle consistent with that inner product;
      (2) in a latent of N ≈ 10³–10⁵ dimensions a vector shrinking along a random (noise-like) direction is
      orthogonal to x up to O(1/√N), so π/2 is the limit for almost every approach and slerp stays continuous there;
      (3) it is the original's value (its NaN → 0 normalisation makes the dot product 0). Falling back to addition,
      ``(1 − w)·x``, would be the limit only along x's own direction (θ → 0), a measure-zero case.
    * norm_only: ``z' + (1 − w)·(‖z'‖·x/‖x‖ − z')`` (the original's ``l1 + c·(‖l1‖·l2/‖l2‖ − l1)``): x's direction
      with z''s magnitude, moved toward z' by w. Continuous in w on all of [0, 1]; its ends are **w = 1 → z'** and
      **w = 0 → ‖z'‖·x/‖x‖**, i.e. x rescaled to z''s norm, *not* x itself (norm_only always imposes z''s magnitude;
      the rescaling is what it does at small weights). A zero x falls back to addition.

    ``w == 1`` returns a copy of z' (cast to x's dtype) for every blend; ``w == 0`` returns a clone of x for addition
    and slerp and the rescaled x for norm_only (its continuous end). The per-step mixer never calls blend for a step
    whose weight is 0, so there weight 0 means "unchanged" for every blend. w may be a float or a one-element tensor
    (read as a Python float; the same number gives bitwise-identical results). Arithmetic runs in float32 (float64
    for float64 inputs).
    """
    if name not in BLENDS:
        raise ArgumentError("blend", name, f"one of {', '.join(BLENDS)}")
    wf = _as_weight(w)
    zprime = _match_batch(zprime.to(device=x.device), x, "zprime")
    if wf == 0.0 and name != "norm_only":
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
        zero = (n1 <= _NORM_EPS) | (n2 <= _NORM_EPS)
        u1 = d1 / n1.clamp_min(_NORM_EPS)[:, None]
        u2 = d2 / n2.clamp_min(_NORM_EPS)[:, None]
        # ω = 2·atan2(‖û1 − û2‖, ‖û1 + û2‖): accurate for tiny and near-π angles, no acos clamping needed.
        omega = 2.0 * torch.atan2((u1 - u2).norm(dim=1), (u1 + u2).norm(dim=1))
        # A zero vector is orthogonal to everything: ω = π/2 (see the docstring for why this is the right limit).
        omega = torch.where(zero, torch.full_like(omega, 0.5 * math.pi), omega)
        sin_o = torch.sin(omega)
        ok = sin_o > _SLERP_MIN_SIN
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
