"""Unit tests for hires mixing's per-step mixer HiresMixer."""

from __future__ import annotations

import math

import pytest
import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.mixing.blends import noise_scaling
from lib_imgcond.mixing.mixer import HiresMixer
from lib_imgcond.mixing.schedules import BLENDS, SCHEDULES, MixParams, zprime_weights
from tests.mixing_cases import latents, sigmas

# ---------------------------------------------------------------------------------------------------------------
# HiresMixer
# ---------------------------------------------------------------------------------------------------------------


def _mixer(params: MixParams | None = None, n: int = 10, **kw) -> tuple[HiresMixer, torch.Tensor]:
    sig = sigmas(n)
    z_up, noise = latents(12)
    kw.setdefault("flow", False)
    kw.setdefault("generator_seed", 123)
    return HiresMixer(params or MixParams(schedule="linear"), sig, z_up, noise, **kw), sig


def test_mixer_attributes_and_step_index():
    m, sig = _mixer()
    assert m.n_steps == 10
    assert m.weights == zprime_weights(MixParams(schedule="linear"), 10)
    for i in range(10):
        assert m.step_index(float(sig[i])) == i
        assert m.step_index(torch.tensor(float(sig[i]), dtype=torch.float32)) == i
        assert m.step_index(torch.full((2,), float(sig[i]))) == i
        assert m.step_index(float(sig[i]) * (1 + 5e-5)) == i
    assert m.step_index(float(sig[3]) * 1.01) is None
    assert m.step_index(0.5 * float(sig[3] + sig[4])) is None  # DPM2-style midpoint
    assert m.step_index(0.0) is None  # the final 0 is not a step


def test_mixer_mixes_in_place_with_expected_values():
    m, sig = _mixer()
    z_up, noise = latents(12)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(13))
    before = x.clone()
    ptr = x.data_ptr()
    i = 3
    assert m.mix_(x, torch.full((2,), float(sig[i]))) is True
    w = m.weights[i]
    zp = z_up + float(sig[i]) * noise
    assert torch.allclose(x, (1 - w) * before + w * zp, atol=1e-6)
    assert x.data_ptr() == ptr
    assert m.mixed_steps == [3]


def test_mixer_euler_sequence_mixes_each_step_once():
    m, sig = _mixer(MixParams(schedule="linear", blend_min=0.1))
    x = torch.zeros(2, 4, 8, 8)
    results = [m.mix_(x, float(sig[i])) for i in range(10)]
    assert results == [True] * 10
    assert m.mixed_steps == list(range(10))
    # repeats, earlier steps and the final 0 are ignored
    snapshot = x.clone()
    assert m.mix_(x, float(sig[9])) is False
    assert m.mix_(x, float(sig[2])) is False
    assert m.mix_(x, 0.0) is False
    assert torch.equal(x, snapshot)


@pytest.mark.parametrize(
    ("substep_repeats_sigma", "later_flags"),
    [(False, [True, False]), (True, [False, True])],
    ids=["default-first-match", "substep-flag"],
)
def test_mixer_heun_sequence(substep_repeats_sigma, later_flags):
    """Heun: σ0, σ1(sub), σ1, σ2(sub), σ2, … — each step mixes exactly once: at its first evaluation by default,
    at its second (the real state) with substep_repeats_sigma."""
    m, sig = _mixer(MixParams(schedule="linear", blend_min=0.1), substep_repeats_sigma=substep_repeats_sigma)
    seq = [0] + [j for i in range(1, 10) for j in (i, i)]
    x = torch.zeros(2, 4, 8, 8)
    flags = [m.mix_(x, float(sig[i])) for i in seq]
    assert flags == [True] + later_flags * 9
    assert m.mixed_steps == list(range(10))


def test_mixer_ignores_off_schedule_substeps():
    m, sig = _mixer(MixParams(schedule="linear", blend_min=0.1))
    x = torch.randn(2, 4, 8, 8)
    flags = []
    for i in range(10):
        flags.append(m.mix_(x, float(sig[i])))
        mid = math.sqrt(float(sig[i]) * float(sig[i + 1])) if sig[i + 1] > 0 else None
        if mid is not None:
            snap = x.clone()
            flags.append(m.mix_(x, mid))
            assert torch.equal(x, snap)
    assert flags == [True, False] * 9 + [True]


@pytest.mark.parametrize("blend", BLENDS)
def test_mixer_blend_max_zero_leaves_x_bitwise_equal(blend):
    # also for norm_only, whose blend at w = 0 rescales x: the mixer does not blend weight-0 steps
    for schedule in SCHEDULES:
        m, sig = _mixer(MixParams(schedule=schedule, blend_max=0.0, normalize=True, blend=blend))
        assert m.weights == [0.0] * 10
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(14)).half()
        before = x.clone()
        assert not any(m.mix_(x, float(sig[i])) for i in range(10))
        assert torch.equal(x, before)
        assert m.handled_steps == list(range(10))
        assert m.mixed_steps == []


def test_mixer_window_only_mixes_inside():
    m, sig = _mixer(MixParams(start=0.2, stop=0.6))
    x = torch.randn(2, 4, 8, 8)
    flags = [m.mix_(x, float(sig[i])) for i in range(10)]
    assert flags == [False, False, True, True, True, True, False, False, False, False]


def test_mixer_first_step_with_same_noise_is_a_fixed_point():
    """At step 0 the sampler starts from noise_scaling(σ0, ε, z_up) = z'_0, so mixing changes (almost) nothing."""
    m, sig = _mixer(MixParams())
    z_up, noise = latents(12)
    x = noise_scaling(float(sig[0]), noise, z_up)
    before = x.clone()
    assert m.mix_(x, float(sig[0])) is True
    assert torch.allclose(x, before, atol=1e-6)


def test_mixer_fresh_noise_is_seeded():
    p = MixParams(schedule="linear", fresh_noise=True)
    m1, sig = _mixer(p, generator_seed=7)
    m2, _ = _mixer(p, generator_seed=7)
    m3, _ = _mixer(p, generator_seed=8)
    assert torch.equal(m1.zprime(2), m2.zprime(2))
    assert not torch.equal(m1.zprime(2), m3.zprime(2))
    z_up, _ = latents(12)
    g = torch.Generator().manual_seed(7 + 2)
    eps = torch.randn(z_up.shape, generator=g)
    assert torch.allclose(m1.zprime(2), z_up + float(sig[2]) * eps)
    with pytest.raises(ArgumentError, match="generator_seed"):
        _mixer(p, generator_seed=None)
    z_up, _ = latents(12)
    HiresMixer(p, sig, z_up, None, False, 1)  # noise may be omitted with fresh noise
    with pytest.raises(ArgumentError, match="noise"):
        HiresMixer(MixParams(), sig, z_up, None, False, 1)


def test_mixer_normalize_matches_zprime_statistics():
    m, sig = _mixer(MixParams(schedule="linear", normalize=True, blend="slerp"))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(15)) * 5 + 2
    assert m.mix_(x, float(sig[4])) is True
    zp = m.zprime(4)
    assert torch.allclose(x.mean(dim=(2, 3)), zp.mean(dim=(2, 3)), atol=1e-4)
    assert torch.allclose(x.std(dim=(2, 3)), zp.std(dim=(2, 3)), atol=1e-4)


def test_mixer_flow_uses_flow_noise_scaling():
    sig = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    z_up, noise = latents(16)
    m = HiresMixer(MixParams(schedule="linear"), sig, z_up, noise, True, None)
    assert torch.allclose(m.zprime(1), 0.75 * noise + 0.25 * z_up)
    x = torch.zeros_like(z_up)
    assert m.mix_(x, 0.75)
    assert torch.allclose(x, m.weights[1] * (0.75 * noise + 0.25 * z_up))


def test_mixer_broadcasts_batch_one_reference_and_half_state():
    sig = sigmas(5)
    z_up, noise = latents(17, (1, 4, 8, 8))
    m = HiresMixer(MixParams(schedule="linear"), sig, z_up, noise, False, None)
    x = torch.randn(3, 4, 8, 8).half()
    assert m.mix_(x, float(sig[1]))
    assert x.dtype == torch.float16
    assert torch.isfinite(x).all()


def test_mixer_rejects_bad_construction():
    z_up, noise = latents(18)
    with pytest.raises(ArgumentError, match="sigmas"):
        HiresMixer(MixParams(), [1.0], z_up, noise, False, None)
    with pytest.raises(ArgumentError, match="sigmas"):
        HiresMixer(MixParams(), [1.0, float("nan"), 0.0], z_up, noise, False, None)
    with pytest.raises(ImgcondError, match="shape"):
        HiresMixer(MixParams(), [1.0, 0.0], z_up, noise[:1], False, None)
    with pytest.raises(ArgumentError, match="alpha"):
        HiresMixer(MixParams(alpha=-1), [1.0, 0.0], z_up, noise, False, None)
    m = HiresMixer(MixParams(), [1.0, 0.0], z_up, noise, False, None)
    with pytest.raises(ImgcondError, match="shape"):
        m.mix_(torch.zeros(2, 3, 8, 8), 1.0)


def test_mixer_reset():
    m, sig = _mixer()
    x = torch.zeros(2, 4, 8, 8)
    assert m.mix_(x, float(sig[0]))
    m.reset()
    assert m.handled_steps == []
    assert m.mix_(x, float(sig[0]))
