"""Rewind (ComfyUI-Iterative-Mixer's option; seeds-algorithms.md §3.4 and §3.8 vector 5) and the pass driver.

The reference is the original's rewind loop written out in plain code: for every range (start, n) the current result
becomes the reference, z'_j = result + σ_j·ε_r, x = z'_start, then Euler steps start … n−1, each followed by the blend
with z'_j at the pass's weight c_j (iterative_mixer order). The denoiser is closed-form, D(x, σ) = (x + σ²μ)/(1 + σ²).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lib_imgcond.common.errors import ArgumentError
from lib_imgcond.mixing.mixer import HiresMixer, mixed_sampling, rewind_seed
from lib_imgcond.mixing.schedules import MixParams, rewind_ranges, zprime_weights

SHAPE = (1, 4, 8, 8)
SIGMAS = [14.6, 10.1, 7.0, 4.8, 3.3, 2.2, 1.4, 0.9, 0.5, 0.25, 0.0]
N = len(SIGMAS) - 1
SEED = 1234


# --- the ranges ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (20, [(0, 20), (10, 20), (15, 20)]),
        (40, [(0, 40), (20, 40), (30, 40)]),
        (30, [(0, 30), (15, 30), (22, 30)]),
        (100, [(0, 100), (50, 100), (75, 100)]),  # the original README's example
    ],
)
def test_rewind_ranges_reference_vectors(n, expected):
    assert rewind_ranges(n, 0.5, 0.8) == expected


def test_rewind_ranges_edges():
    # up to rewind_max = 1: 0 → 10 → 15 → 17 → 18 → 19, then ⌊1·0.5⌋ = 0 does not advance
    assert rewind_ranges(20, 0.5, 1.0) == [(0, 20), (10, 20), (15, 20), (17, 20), (18, 20), (19, 20)]
    assert rewind_ranges(10, 0.05, 0.8) == [(0, 10)]  # ⌊10·0.05⌋ = 0: no rewind at all
    assert rewind_ranges(3, 0.5, 0.6) == [(0, 3), (1, 3)]  # the next start 1 + ⌊2·0.5⌋ = 2 is past ⌊3·0.6⌋ = 1
    assert rewind_ranges(20, 0.25, 0.5) == [(0, 20), (5, 20), (8, 20)]  # 8 + ⌊12·0.25⌋ = 11 > 10
    assert rewind_ranges(1, 0.5, 0.8) == [(0, 1)]
    assert rewind_ranges(100, 0.29, 0.5) == [(0, 100), (29, 100), (49, 100)]  # ⌊0.29·100⌋ = 29 (int() gives 28)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rewind_min": 0.8, "rewind_max": 0.5}, "rewind_min"),
        ({"rewind_min": 0.6, "rewind_max": 0.6}, "rewind_min"),
        ({"rewind_min": 0.0, "rewind_max": 0.8}, "rewind_min"),
        ({"rewind_min": 0.5, "rewind_max": 1.5}, "rewind_max"),
        ({"rewind_min": 0.5, "rewind_max": "0.8"}, "rewind_max"),
    ],
)
def test_rewind_arguments_are_validated_by_name(kwargs, name):
    with pytest.raises(ArgumentError) as info:
        rewind_ranges(20, **kwargs)
    assert info.value.name == name
    with pytest.raises(ArgumentError) as info:
        MixParams(rewind=True, **kwargs).validate()
    assert info.value.name == name


def test_min_below_max_is_required_only_with_rewind_on():
    with pytest.raises(ArgumentError, match=r"rewind_min=0\.9 .*< rewind_max \(0\.8\)"):
        MixParams(rewind=True, rewind_min=0.9).validate()
    MixParams(rewind=False, rewind_min=0.9).validate()  # an unused pair (e.g. mid-edit in the UI) is fine
    with pytest.raises(ArgumentError, match="rewind"):
        dataclasses.replace(MixParams(), rewind="yes").validate()
    assert MixParams().rewind is False and (MixParams().rewind_min, MixParams().rewind_max) == (0.5, 0.8)


# --- the driver against the original's rewind loop -------------------------------------------------------------------
def _inputs():
    g = torch.Generator().manual_seed(41)
    return tuple(torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))  # μ, z_up, ε


def _round_noise(r, eps):
    if r == 0:
        return eps
    g = torch.Generator().manual_seed(rewind_seed(SEED, r))
    return torch.randn(SHAPE, generator=g, dtype=torch.float32).double()


def original_rewind(mu, z_up, eps, c, ranges):
    x = z_up
    for r, (start, end) in enumerate(ranges):
        e = _round_noise(r, eps)
        zprime = [x + SIGMAS[j] * e for j in range(start, end)]
        x = zprime[0].clone()
        for k, j in enumerate(range(start, end)):
            denoised = (x + SIGMAS[j] ** 2 * mu) / (1 + SIGMAS[j] ** 2)
            x = x + (x - denoised) / SIGMAS[j] * (SIGMAS[j + 1] - SIGMAS[j])
            x = (1 - c[j]) * zprime[k] + c[j] * x  # addition: (1 − c)·l1 + c·l2
    return x


def euler_sample(mu, log):
    def sample(mixer, x, sigmas, start):
        x_in = x.clone()
        for i in range(len(sigmas) - 1):
            mixer.mix_(x, sigmas[i])
            denoised = (x + sigmas[i] ** 2 * mu) / (1 + sigmas[i] ** 2)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        log.append((start, x_in, x.clone()))
        return x

    return sample


def test_rewind_reproduces_the_originals_rewind_loop():
    mu, z_up, eps = _inputs()
    params = MixParams(schedule="im_cosine", alpha=2.4, order="iterative_mixer", rewind=True, blend_max=0.9)
    ranges = rewind_ranges(N, 0.5, 0.8)
    assert ranges == [(0, 10), (5, 10), (7, 10), (8, 10)]  # 8 + ⌊2·0.5⌋ = 9 > ⌊10·0.8⌋
    c = [1 - w for w in zprime_weights(params, N)]
    ref = original_rewind(mu, z_up, eps, c, ranges)
    mixers, log = [], []
    x0 = z_up + SIGMAS[0] * eps
    out = mixed_sampling(euler_sample(mu, log), x0, SIGMAS, params, z_up, eps, seed=SEED, on_mixer=mixers.append)
    assert (out - ref).abs().max().item() <= 1e-5
    assert [m.n_steps for m in mixers] == [10, 5, 3, 2]
    assert [start for start, *_ in log] == [0, 5, 7, 8]
    assert mixers[1].weights == zprime_weights(params, N)[5:]
    assert mixers[2].sigmas == SIGMAS[7:]
    # without rewind the result differs (so the comparison above can fail)
    plain = mixed_sampling(euler_sample(mu, []), x0, SIGMAS, dataclasses.replace(params, rewind=False), z_up, eps)
    assert (plain - ref).abs().max().item() > 1e-3


def test_rewind_round_restarts_from_the_renoised_result_in_demofusion_order():
    mu, z_up, eps = _inputs()
    params = MixParams(schedule="linear", rewind=True, rewind_min=0.6, rewind_max=0.9)
    mixers, log = [], []
    x0 = z_up + SIGMAS[0] * eps
    mixed_sampling(euler_sample(mu, log), x0, SIGMAS, params, z_up, eps, seed=SEED, on_mixer=mixers.append)
    assert [start for start, *_ in log] == [0, 6, 8, 9]
    # each round starts from the previous round's result re-noised to σ_start with the round's own noise
    for r, (start, x_in, _) in enumerate(log[1:], 1):
        assert torch.allclose(x_in, log[r - 1][2] + SIGMAS[start] * _round_noise(r, eps), atol=1e-12)
    assert not torch.allclose(_round_noise(1, eps), _round_noise(2, eps))
    assert all(m.mixed_steps == list(range(m.n_steps)) for m in mixers)


def test_rewind_seeds_and_fresh_noise():
    _, z_up, eps = _inputs()
    x0 = z_up + SIGMAS[0] * eps
    mixers: list[HiresMixer] = []
    params = MixParams(rewind=True, fresh_noise=True)
    mixed_sampling(lambda m, x, s, start: x, x0, SIGMAS, params, z_up, None, seed=SEED, on_mixer=mixers.append)
    assert [m.generator_seed for m in mixers] == [SEED, *(rewind_seed(SEED, r) for r in (1, 2, 3))]
    assert rewind_seed(SEED, 1) == SEED + 1_000_003
    with pytest.raises(ArgumentError, match="seed"):
        mixed_sampling(lambda m, x, s, start: x, x0, SIGMAS, MixParams(rewind=True), z_up, eps)


def test_mixer_weights_override_is_validated():
    _, z_up, eps = _inputs()
    m = HiresMixer(MixParams(), SIGMAS[:4], z_up, eps, weights=[0.5, 0.25, 0.0])
    assert m.weights == [0.5, 0.25, 0.0]
    with pytest.raises(ArgumentError, match="weights"):
        HiresMixer(MixParams(), SIGMAS[:4], z_up, eps, weights=[0.5, 0.25])
    with pytest.raises(ArgumentError, match="weights"):
        HiresMixer(MixParams(), SIGMAS[:4], z_up, eps, weights=[0.5, 0.25, 1.5])
