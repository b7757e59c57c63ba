"""Mixing order: `iterative_mixer` reproduces ComfyUI-Iterative-Mixer's Euler sampler (seeds-algorithms.md §3.1).

The reference below is the original's algorithm written out step by step in plain code (its own blend formulas, its
denoised-weight convention c = 1 − w, its "blend after the update with z'_i"); ours is a plain k-diffusion Euler loop
that only calls HiresMixer the way the Forge glue does (mix_ before every model call, finish_ on the result).
The denoiser is closed-form: for data ~ N(μ, I), D(x, σ) = E[x₀ | x] = (x + σ²μ)/(1 + σ²).
"""

from __future__ import annotations

import math

import pytest
import torch

from lib_imgcond.common.errors import ArgumentError
from lib_imgcond.mixing.mixer import HiresMixer
from lib_imgcond.mixing.schedules import BLENDS, ORDERS, MixParams, im_denoised_weights, zprime_weights

SHAPE = (2, 4, 16, 16)
SIGMAS = [14.6, 9.7, 6.5, 4.4, 2.9, 1.9, 1.2, 0.7, 0.4, 0.15, 0.0]
N = len(SIGMAS) - 1


def _inputs():
    g = torch.Generator().manual_seed(31)
    mu = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    z_up = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return mu, z_up, eps


def denoiser(mu):
    return lambda x, sigma: (x + sigma**2 * mu) / (1.0 + sigma**2)


# --- the original, in plain code --------------------------------------------------------------------------------------
def original_blend(name, l1, l2, c):
    """ComfyUI-Iterative-Mixer's blends: l1 = z'_i, l2 = the sampler's x, c = weight of the DENOISED latent (x)."""
    out = []
    for a, b in zip(l1.reshape(l1.shape[0], -1), l2.reshape(l2.shape[0], -1), strict=True):
        if name == "addition":
            r = (1 - c) * a + c * b
        elif name == "norm_only":
            r = a + c * (b / b.norm() * a.norm() - a)
        else:  # slerp (BlenderNeko's): ω = arccos(⟨â, b̂⟩), sin((1 − c)ω)/sin ω · a + sin(cω)/sin ω · b
            omega = math.acos(float((a / a.norm() * (b / b.norm())).sum()))
            r = math.sin((1 - c) * omega) / math.sin(omega) * a + math.sin(c * omega) / math.sin(omega) * b
        out.append(r)
    return torch.stack(out).reshape(l1.shape)


def original_sampler(D, z_up, eps, sigmas, c, blend_name):
    """IterativeMixingSampler + its Euler: x = z'_0, then per step Euler update, then blend with z'_i at c_i."""
    zprime = [z_up + s * eps for s in sigmas[:-1]]
    x = zprime[0].clone()
    states = []
    for i in range(len(sigmas) - 1):
        d = (x - D(x, sigmas[i])) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        x = original_blend(blend_name, zprime[i], x, c[i])
        states.append(x.clone())
    return x, states


# --- ours: a plain Euler loop driving HiresMixer like the glue --------------------------------------------------------
def mixed_euler(D, z_up, eps, sigmas, params):
    mixer = HiresMixer(params, sigmas, z_up, eps)
    x = z_up + sigmas[0] * eps  # what Forge's hires pass hands the sampler (the pass's noise)
    inputs = []
    for i in range(len(sigmas) - 1):
        mixer.mix_(x, sigmas[i])  # the proxy model, before the real denoiser
        inputs.append(x.clone())
        d = (x - D(x, sigmas[i])) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    mixer.finish_(x)  # the glue, on the sampling function's result
    return x, inputs, mixer


@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("schedule", ["demofusion_cosine", "im_cosine", "linear", "logistic"])
def test_iterative_mixer_order_reproduces_the_original_sampler(schedule, blend):
    mu, z_up, eps = _inputs()
    params = MixParams(schedule=schedule, alpha=2.4, blend=blend, blend_min=0.1, blend_max=0.9, order="iterative_mixer")
    c = [1.0 - w for w in zprime_weights(params, N)]  # the same schedule, in the original's convention
    assert all(0.0 < v < 1.0 for v in c)
    ref, ref_states = original_sampler(denoiser(mu), z_up, eps, SIGMAS, c, blend)
    out, inputs, mixer = mixed_euler(denoiser(mu), z_up, eps, SIGMAS, params)
    assert (out - ref).abs().max().item() <= 1e-5
    # step by step: what the model sees at step i+1 is the original's state after step i's update and blend
    for i in range(N - 1):
        assert (inputs[i + 1] - ref_states[i]).abs().max().item() <= 1e-5
    assert mixer.mixed_steps == list(range(N))
    assert mixer.handled_steps == list(range(N))
    assert not mixer.finish_(out)  # the last blend is applied once


def test_iterative_mixer_order_with_the_originals_own_default_schedule():
    # the original's default: cosine, α₁ = 2.4, addition; our im_cosine is exactly 1 − its c
    mu, z_up, eps = _inputs()
    c = im_denoised_weights(N, alpha=2.4)
    ref, _ = original_sampler(denoiser(mu), z_up, eps, SIGMAS, c, "addition")
    out, _, _ = mixed_euler(denoiser(mu), z_up, eps, SIGMAS, MixParams("im_cosine", 2.4, order="iterative_mixer"))
    assert (out - ref).abs().max().item() <= 1e-5


def test_demofusion_order_is_the_default_and_differs_from_the_original():
    assert MixParams().order == "demofusion" and ORDERS == ("demofusion", "iterative_mixer")
    mu, z_up, eps = _inputs()
    params = MixParams(schedule="linear", blend_max=0.9)
    c = [1.0 - w for w in zprime_weights(params, N)]
    ref, _ = original_sampler(denoiser(mu), z_up, eps, SIGMAS, c, "addition")
    out, inputs, mixer = mixed_euler(denoiser(mu), z_up, eps, SIGMAS, params)
    assert (out - ref).abs().max().item() > 1e-2  # the comparison above can fail
    assert not mixer.finish_(out)  # demofusion has no post-sampling blend
    # demofusion: the model of step i sees blend(z'_i, x, w_i), z'_i at the model's own level σ_i
    w = zprime_weights(params, N)
    x = z_up + SIGMAS[0] * eps
    for i in range(N):
        zp = z_up + SIGMAS[i] * eps
        x = (1 - w[i]) * x + w[i] * zp
        assert torch.allclose(inputs[i], x, atol=1e-9)
        x = x + (x - denoiser(mu)(x, SIGMAS[i])) / SIGMAS[i] * (SIGMAS[i + 1] - SIGMAS[i])


def test_iterative_mixer_heun_blends_the_real_state_after_each_update():
    # Heun-like: σ0, σ1 (predictor), σ1 (real), …; with substep_repeats_sigma the blend of step i−1 lands on the real
    # state at σ_i, never on the predictor's temporary
    _, z_up, eps = _inputs()
    params = MixParams(schedule="linear", order="iterative_mixer")
    m = HiresMixer(params, SIGMAS, z_up, eps, substep_repeats_sigma=True)
    flags = [m.mix_(torch.zeros(SHAPE, dtype=torch.float64), SIGMAS[0])]
    for i in range(1, N):
        flags += [m.mix_(torch.zeros(SHAPE, dtype=torch.float64), s) for s in (SIGMAS[i], SIGMAS[i])]
    assert flags == [False] + [False, True] * (N - 1)
    assert m.mixed_steps == list(range(N - 1))
    assert m.finish_(torch.zeros(SHAPE, dtype=torch.float64))
    assert m.mixed_steps == list(range(N))


def test_iterative_mixer_finish_needs_the_last_step_and_skips_zero_weight():
    _, z_up, eps = _inputs()
    m = HiresMixer(MixParams(order="iterative_mixer"), SIGMAS, z_up, eps)
    x = torch.zeros(SHAPE, dtype=torch.float64)
    assert not m.finish_(x)  # nothing sampled yet
    m.mix_(x, SIGMAS[0])
    assert not m.finish_(x)  # the last step was never reached
    zero = HiresMixer(MixParams(order="iterative_mixer", clamp=0.5), SIGMAS, z_up, eps)
    for s in SIGMAS[:-1]:
        zero.mix_(x, s)
    before = x.clone()
    assert not zero.finish_(x) and torch.equal(x, before)  # w_{n−1} = 0 after the clamp
    assert zero.mixed_steps == list(range(5))


def test_order_is_validated():
    with pytest.raises(ArgumentError, match="order") as info:
        MixParams(order="after").validate()
    assert "demofusion, iterative_mixer" in str(info.value)
