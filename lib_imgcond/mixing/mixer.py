"""Hires-pass latent mixing: Iterative Mixing / DemoFusion "skip residual" schedules, blends and the per-step mixer.

Conventions used throughout this module
---------------------------------------
* ``w`` is always the weight on the **noised reference** ``z'_i = noise_scaling(σ_i, ε, z_up)``; ``1 − w`` is the
  weight on the sampler's own latent ``x``. In the mixer a step with ``w = 0`` is not mixed: ``x`` stays untouched
  bitwise whatever the blend (``blend`` itself is continuous in ``w``, so norm_only's ``w = 0`` end is x rescaled to
  ``‖z'‖``, see ``blend``).
  (Iterative Mixing's code uses the opposite convention: its ``c`` weights the denoised latent. ``im_denoised_weights``
  reproduces that convention for reference; everything else here speaks ``w``.)
* Steps are the sampler steps of the hires pass, ``i = 0 … n−1``, one per entry of the sigma schedule minus the final 0.
* Order (``MixParams.order``): ``demofusion`` (default) mixes before the model evaluation of step ``i``, at the
  matching noise level σ_i (DemoFusion's skip residual). ``iterative_mixer`` mixes after step ``i``'s sampler update,
  with z'_i while x is already at σ_{i+1} (Iterative Mixing's order, one-level mismatch included): the blend of step
  ``i`` happens at the evaluation of step ``i + 1`` (before the model sees x) and, for the last step, in
  ``HiresMixer.finish_`` on the sampler's result.

Window semantics (applies to every schedule)
--------------------------------------------
With ``a = ⌊start·n⌋``, ``S = ⌊stop·n⌋`` (``S = 0`` when ``stop == 0``; when ``0 < stop·n < 1``, ``S = n`` for
linear, as in Iterative Mixing, and ``S = 1`` otherwise) and ``C = ⌊clamp·n⌋``, mixing is active for
``a ≤ i < min(S, C)``. Outside that window the weight is exactly ``0.0`` (not ``blend_min``). Inside it the
schedule's curve value ``w ∈ [0, 1]`` is squeezed into ``[blend_min, blend_max]``: ``w' = blend_min + w·(blend_max −
blend_min)``; ``blend_max = 0`` therefore gives all-zero weights. The curves use the progress ``p = i / S`` so that
``stop > 1`` stretches them beyond the last step. ``⌊f·n⌋`` is computed with a 1e-9 tolerance so that e.g.
``0.29·100`` gives 29 (plain ``int()`` gives 28).

Rewind (``MixParams.rewind``): ``mixed_sampling`` runs the pass, then re-noises its result and samples again over
the later ranges of ``rewind_ranges`` (Iterative Mixing's rewind), one HiresMixer per round.

The implementation is split by concern: ``schedules`` (MixParams, weight schedules, rewind ranges, the plot),
``blends`` (blend functions, mean/std matching, noise scaling) and this module (the per-step mixer and the
pass driver). Everything
public is re-exported here, so ``from lib_imgcond.mixing.mixer import …`` keeps working. Only the
standard library and torch are imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.mixing.blends import _compute_dtype, _match_batch, blend, match_mean_std, noise_scaling
from lib_imgcond.mixing.schedules import MixParams, _is_number, rewind_ranges, zprime_weights

__all__ = ["HiresMixer", "mixed_sampling", "rewind_seed"]

_SIGMA_RTOL = 1e-4


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
        weights: the z' weight per step; default ``zprime_weights(params, n)`` (a rewind round passes its slice of
            the whole pass's weights).

    Step detection: ``mix_`` is called on every model evaluation. A sigma matches step i if it lies within 1e-4
    (relative) of σ_i (the final 0 never matches). Each step is handled at most once and only in increasing order:
    the first evaluation that matches a step later than the last handled one handles it; repeats and earlier steps
    are ignored. Sub-evaluations at off-schedule sigmas (DPM2, DPM++ 2S, SDE midpoints) never match.
    Remaining ambiguity: from sigmas alone, a Heun sub-evaluation at σ_{i+1} is indistinguishable from step i+1's
    own evaluation, so without ``substep_repeats_sigma`` Heun mixes step i+1 into the predictor's temporary x_2 and
    then ignores the real evaluation; Euler with s_churn > 0 evaluates at σ̂ ≠ σ_i and is never mixed.

    Order: with ``params.order == "iterative_mixer"`` the detection of step i ≥ 1 applies step i−1's blend
    (z'_{i−1}, w_{i−1}) to the state the sampler reached after step i−1's update, and ``finish_`` applies step n−1's
    blend to the sampler's result (call it once the sampling function returns). A blend is applied only when the
    evaluation that follows its step is detected (Euler with s_churn > 0 is never mixed, as above).

    Attributes: ``weights`` (list of z' weights, len n), ``n_steps``, ``sigmas`` (list of floats),
    ``handled_steps`` (steps detected, in order) and ``mixed_steps`` (the steps whose blend changed x, in order;
    with iterative_mixer, step i's blend is recorded when it is applied, at step i+1 or in finish_).
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
        weights: Sequence[float] | None = None,
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
        if weights is None:
            self.weights: list[float] = zprime_weights(params, self.n_steps)
        else:
            self.weights = [float(v) for v in weights]
            if len(self.weights) != self.n_steps or not all(0.0 <= v <= 1.0 for v in self.weights):
                raise ArgumentError("weights", list(weights)[:8], f"{self.n_steps} numbers in [0, 1] (one per step)")
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
        self._finished = False

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

        x ← blend(params.blend, z'_j, x, w_j); with normalize, x's per-channel mean/std are then matched to z'_j's.
        j = i (demofusion) or i − 1 (iterative_mixer; nothing at step 0). Returns False (x untouched bitwise) for
        sub-steps, repeats, earlier steps and when w_j == 0 (the detected step is still recorded as handled).
        """
        i = self._pick_step(sigma)
        if i is None:
            return False
        self.handled_steps.append(i)
        if self.params.order == "iterative_mixer":
            return i >= 1 and self._apply(x, i - 1)
        return self._apply(x, i)

    def finish_(self, x: torch.Tensor) -> bool:
        """After sampling: apply the last step's post-update blend IN PLACE (iterative_mixer order only).

        True when x was changed: only with iterative_mixer, when step n−1 was detected, its blend not yet applied
        and w_{n−1} ≠ 0. A no-op returning False for demofusion (its blends all happen before model calls).
        """
        last = self.n_steps - 1
        if self.params.order != "iterative_mixer" or not self.handled_steps or self.handled_steps[-1] != last:
            return False
        if self._finished:
            return False
        self._finished = True
        return self._apply(x, last)

    def _apply(self, x: torch.Tensor, j: int) -> bool:
        w = self.weights[j]
        if w == 0.0:
            return False
        with torch.no_grad():
            cd = _compute_dtype(x.dtype)
            zp = _match_batch(self.zprime(j, x.device, cd), x, "z_up")
            mixed = blend(self.params.blend, zp, x.to(cd), w)
            if self.params.normalize:
                mixed = match_mean_std(mixed, zp)
            x.copy_(mixed.to(x.dtype))
        self.mixed_steps.append(j)
        return True


# --------------------------------------------------------------------------------------------------------------------
# the whole pass, with rewind
# --------------------------------------------------------------------------------------------------------------------

_ROUND_SEED_STRIDE = 1_000_003


def rewind_seed(seed: int, round_index: int) -> int:
    """Seed of rewind round r ≥ 1: ``(seed + r·1 000 003) mod 2⁶³`` (round 0 keeps the pass's own seed)."""
    return (int(seed) + _ROUND_SEED_STRIDE * int(round_index)) % (1 << 63)


def mixed_sampling(
    sample: Callable[[HiresMixer, torch.Tensor, Any, int], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    params: MixParams,
    z_up: torch.Tensor,
    noise: torch.Tensor | None,
    flow: bool = False,
    seed: int | None = None,
    *,
    substep_repeats_sigma: bool = False,
    on_mixer: Callable[[HiresMixer], Any] | None = None,
) -> torch.Tensor:
    """Run one hires pass with mixing: ``sample(mixer, x, sigmas_part, start)`` runs the sampler once over
    ``sigmas_part`` with ``mixer.mix_`` called before every model evaluation, and returns its result.

    Without rewind that is one call over all of ``sigmas`` from ``x``, then ``mixer.finish_``. With
    ``params.rewind``, for every further range ``(start, n)`` of ``rewind_ranges(n, rewind_min, rewind_max)`` (the
    Iterative Mixer's rewind): the current result becomes the new reference ``z_up``, a new noise ε_r is drawn
    (``randn`` on a CPU generator seeded ``rewind_seed(seed, r)``; with fresh_noise the round's per-step noise uses
    that seed as its base instead), the sampler restarts from ``z'_start = noise_scaling(σ_start, ε_r, result)`` and
    runs over ``sigmas[start:]`` with the weights ``w[start:]`` of the whole pass's schedule. ``seed`` is required
    with rewind or fresh_noise. ``on_mixer`` is called with each round's mixer.
    """
    params.validate()
    if (params.rewind or params.fresh_noise) and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ArgumentError("seed", seed, "an integer seed when rewind or fresh_noise is on")
    n = len(sigmas) - 1
    weights = zprime_weights(params, n)
    ranges = rewind_ranges(n, params.rewind_min, params.rewind_max) if params.rewind and n >= 1 else [(0, n)]
    ref, eps = z_up, noise
    for r, (start, _end) in enumerate(ranges):
        round_seed = seed if r == 0 or seed is None else rewind_seed(seed, r)
        if r:
            ref = x.detach().clone()
            eps = None
            if not params.fresh_noise:
                g = torch.Generator(device="cpu").manual_seed(round_seed)  # type: ignore[arg-type]
                eps = torch.randn(tuple(ref.shape), generator=g, dtype=torch.float32).to(ref.device, ref.dtype)
        mixer = HiresMixer(
            params,
            sigmas[start:],
            ref,
            eps,
            flow,
            round_seed,
            substep_repeats_sigma=substep_repeats_sigma,
            weights=weights[start:],
        )
        if on_mixer is not None:
            on_mixer(mixer)
        if r:
            x = mixer.zprime(0, x.device, x.dtype)  # the re-noised result at σ_start, as the original restarts
        x = sample(mixer, x, sigmas[start:], start)
        mixer.finish_(x)
    return x
