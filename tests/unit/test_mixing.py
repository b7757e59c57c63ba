"""Unit tests for lib_imgcond.core.mixing (reference vectors: seeds-algorithms.md §3.8; crash list: §7)."""

from __future__ import annotations

import dataclasses
import math
import xml.etree.ElementTree as ET

import pytest
import torch

from lib_imgcond.core.errors import ArgumentError, ImgcondError
from lib_imgcond.core.mixing import (
    BLENDS,
    SCHEDULES,
    HiresMixer,
    MixParams,
    blend,
    demofusion_c1,
    demofusion_c3,
    demofusion_cf,
    im_denoised_weights,
    match_mean_std,
    noise_scaling,
    schedule_svg,
    zprime_weights,
)


def _vec(*values: float) -> torch.Tensor:
    """A single-item batch (1, len, 1, 1) so per-item blends see exactly this vector."""
    return torch.tensor(values, dtype=torch.float64).reshape(1, -1, 1, 1)


def _sigmas(n: int = 10) -> torch.Tensor:
    s = torch.linspace(10.0, 0.5, n, dtype=torch.float64)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def _latents(seed: int = 0, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    z_up = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    return z_up, noise


# ---------------------------------------------------------------------------------------------------------------
# §3.8 vectors 1–3: original Iterative Mixing schedules (denoised-weight convention)
# ---------------------------------------------------------------------------------------------------------------


def test_im_cosine_vector_1():
    c = im_denoised_weights(20, alpha=2.4, schedule="cosine")
    expected = {0: 0.0, 1: 5e-6, 5: 0.009946, 10: 0.189465, 15: 0.683839, 19: 0.985290}
    for i, v in expected.items():
        assert c[i] == pytest.approx(v, abs=1e-6), i
    assert im_denoised_weights(20, alpha=3.0)[10] == pytest.approx(0.125, abs=1e-12)
    assert im_denoised_weights(20, alpha=1.0)[10] == pytest.approx(0.5, abs=1e-12)
    assert im_denoised_weights(20, alpha=3.0, schedule="im_cosine") == im_denoised_weights(20, alpha=3.0)


def test_im_linear_and_logistic_vector_2():
    lin = im_denoised_weights(20, schedule="linear")
    assert lin == pytest.approx([i / 20 for i in range(20)])
    assert lin[-1] == pytest.approx(0.95)
    lo = im_denoised_weights(20, alpha=2.4, schedule="logistic")
    for i, v in {0: 0.001804, 5: 0.040781, 10: 0.5, 19: 0.996612}.items():
        assert lo[i] == pytest.approx(v, abs=1e-6), i


def test_im_squeeze_and_clamp_vector_3():
    c = im_denoised_weights(20, alpha=3.0, blend_min=0.2, blend_max=0.9)
    assert c[10] == pytest.approx(0.2875, abs=1e-12)
    clamped = im_denoised_weights(20, alpha=2.4, clamp=0.5)
    assert clamped[10:] == [1.0] * 10
    assert clamped[:10] == im_denoised_weights(20, alpha=2.4)[:10]
    squeezed = im_denoised_weights(20, alpha=2.4, clamp=0.5, blend_min=0.2, blend_max=0.9)
    assert squeezed[10:] == pytest.approx([0.9] * 10)


def test_im_cosine_ignores_start_linear_does_not():
    assert im_denoised_weights(20, start=0.5) == im_denoised_weights(20)
    lin = im_denoised_weights(20, start=0.25, schedule="linear")
    assert lin[:5] == [0.0] * 5
    assert lin[5] == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------------------------
# §3.8 vector 6: DemoFusion
# ---------------------------------------------------------------------------------------------------------------


def test_demofusion_vector_6():
    assert demofusion_cf(981) == pytest.approx(0.99911, abs=1e-5)
    assert demofusion_c1(981, alpha=3) == pytest.approx(0.99733, abs=1e-5)
    assert demofusion_cf(501) == pytest.approx(0.50157, abs=1e-5)
    assert demofusion_c1(501, alpha=3) == pytest.approx(0.12618, abs=1e-5)
    assert demofusion_c1(1, alpha=3) == pytest.approx(0.0, abs=1e-12)
    assert demofusion_c3(1) == pytest.approx(0.0100, abs=1e-5)
    assert demofusion_c1(1000) == 1.0


def test_demofusion_schedule_matches_t_based_formula():
    """Our step-progress c₁ equals DemoFusion's t-based c₁ at t = T·(1 − i/n) (50 steps, α = 3)."""
    n = 50
    w = zprime_weights(MixParams(), n)
    for i in range(n):
        assert w[i] == pytest.approx(demofusion_c1(1000 - 1000 * i / n, alpha=3.0), abs=1e-12), i
    assert w[0] == 1.0
    assert w[25] == pytest.approx(0.125, abs=1e-12)
    # The SDXL Euler timesteps 981, 961, … sit 0.019 of progress later than i/n: same curve, shifted.
    timesteps = list(range(981, 0, -20))
    assert len(timesteps) == n
    assert demofusion_c1(timesteps[12]) == pytest.approx(
        zprime_weights(MixParams(stop=1.0), 1000)[1000 - timesteps[12]], abs=1e-12
    )


def test_demofusion_vs_iterative_mixing_cosine():
    """Same "0.125" at p = ½, α = 3, but attached to opposite terms (§3.6)."""
    df = zprime_weights(MixParams(schedule="demofusion_cosine", alpha=3.0), 20)
    im = zprime_weights(MixParams(schedule="im_cosine", alpha=3.0), 20)
    assert df[10] == pytest.approx(0.125)
    assert im[10] == pytest.approx(0.875)
    assert im == pytest.approx([1 - c for c in im_denoised_weights(20, alpha=3.0)], abs=1e-12)
    one_df = zprime_weights(MixParams(schedule="demofusion_cosine", alpha=1.0), 20)
    one_im = zprime_weights(MixParams(schedule="im_cosine", alpha=1.0), 20)
    assert one_df == pytest.approx(one_im, abs=1e-12)


def test_linear_and_logistic_zprime_weights():
    assert zprime_weights(MixParams(schedule="linear"), 20) == pytest.approx([1 - i / 20 for i in range(20)])
    lo = zprime_weights(MixParams(schedule="logistic", alpha=2.4), 20)
    ref = im_denoised_weights(20, alpha=2.4, schedule="logistic")
    assert lo == pytest.approx([1 - c for c in ref], abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# window, clamp, squeeze
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_window_semantics(schedule):
    n = 20
    p = MixParams(schedule=schedule, alpha=2.0, start=0.25, stop=0.75, blend_min=0.1, blend_max=0.8)
    w = zprime_weights(p, n)
    assert len(w) == n
    assert w[:5] == [0.0] * 5  # before start: exactly 0, not blend_min
    assert w[15:] == [0.0] * 5  # from stop on: exactly 0
    raw = zprime_weights(dataclasses.replace(p, blend_min=0.0, blend_max=1.0), n)
    for i in range(5, 15):
        assert 0.1 <= w[i] <= 0.8
        assert w[i] == pytest.approx(0.1 + raw[i] * 0.7, abs=1e-12)


def test_clamp_cuts_the_window():
    full = zprime_weights(MixParams(schedule="linear"), 20)
    w = zprime_weights(MixParams(schedule="linear", clamp=0.5, blend_min=0.3), 20)
    assert w[10:] == [0.0] * 10
    assert w[:10] == pytest.approx([0.3 + 0.7 * v for v in full[:10]])


def test_stop_above_one_stretches_the_curve():
    w = zprime_weights(MixParams(stop=2.0), 10)
    assert all(v > 0 for v in w)
    assert w == pytest.approx([demofusion_c1(1000 - 1000 * i / 20) for i in range(10)], abs=1e-12)


def test_start_after_stop_means_no_mixing():
    assert zprime_weights(MixParams(start=0.8, stop=0.5), 10) == [0.0] * 10


def test_fraction_rounding_is_robust():
    # 0.29 * 100 = 28.999999999999996 in binary; the window must still start at step 29.
    w = zprime_weights(MixParams(schedule="linear", start=0.29), 100)
    assert w[28] == 0.0
    assert w[29] > 0.0


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_blend_max_zero_gives_exact_zero_weights(schedule):
    w = zprime_weights(MixParams(schedule=schedule, blend_min=0.0, blend_max=0.0), 30)
    assert w == [0.0] * 30
    assert all(type(v) is float for v in w)


def test_zero_and_one_step():
    assert zprime_weights(MixParams(), 0) == []
    assert zprime_weights(MixParams(), 1) == [1.0]


# ---------------------------------------------------------------------------------------------------------------
# §7: stop rounding to 0, logistic NameError, NaN-free
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_stop_rounding_to_zero_is_well_defined(schedule):
    w = zprime_weights(MixParams(schedule=schedule, stop=0.04), 20)
    assert all(math.isfinite(v) for v in w)
    assert w[1:] == [0.0] * 19  # S = 1: only step 0 lies in the window
    assert zprime_weights(MixParams(schedule=schedule, stop=0.0), 20) == [0.0] * 20


@pytest.mark.parametrize("schedule", ["cosine", "linear", "logistic"])
def test_original_schedule_stop_rounding_to_zero_no_nan(schedule):
    c = im_denoised_weights(20, alpha=2.4, stop=0.04, schedule=schedule)
    assert len(c) == 20
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in c)
    assert all(math.isfinite(v) for v in im_denoised_weights(1, schedule=schedule))


def test_logistic_with_huge_alpha_does_not_overflow():
    w = zprime_weights(MixParams(schedule="logistic", alpha=100.0), 200)
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in w)
    assert all(math.isfinite(v) for v in im_denoised_weights(200, alpha=100.0, schedule="logistic"))


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("schedule", "cosine"),
        ("blend", "lerp"),
        ("alpha", 0.0),
        ("alpha", 101.0),
        ("alpha", float("nan")),
        ("alpha", "3"),
        ("start", -0.1),
        ("start", 1.5),
        ("stop", 2.5),
        ("stop", -1.0),
        ("clamp", 1.01),
        ("blend_min", -0.2),
        ("blend_max", 1.2),
        ("blend_max", True),
        ("normalize", 1),
        ("fresh_noise", "yes"),
    ],
)
def test_validate_names_the_argument(field, value):
    p = dataclasses.replace(MixParams(), **{field: value})
    with pytest.raises(ArgumentError) as info:
        p.validate()
    assert info.value.name == field
    assert field in str(info.value)
    assert repr(value) in str(info.value)


def test_validate_blend_min_above_max():
    with pytest.raises(ArgumentError, match="blend_min") as info:
        MixParams(blend_min=0.6, blend_max=0.4).validate()
    assert "blend_max" in str(info.value)


def test_validate_accepts_defaults_and_edges():
    assert MixParams().validate() == MixParams()
    MixParams(alpha=100, start=1.0, stop=2.0, clamp=0.0, blend_min=1.0, blend_max=1.0).validate()
    assert isinstance(ArgumentError("x", 1, "y"), ImgcondError)


def test_zprime_weights_rejects_bad_steps():
    with pytest.raises(ArgumentError, match="n_steps"):
        zprime_weights(MixParams(), -1)
    with pytest.raises(ArgumentError, match="n_steps"):
        zprime_weights(MixParams(), 2.5)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="schedule"):
        im_denoised_weights(20, schedule="demofusion_cosine")


# ---------------------------------------------------------------------------------------------------------------
# §3.8 vector 4 and blend properties
# ---------------------------------------------------------------------------------------------------------------


def test_blend_vector_4():
    l1, l2 = _vec(1.0, 0.0), _vec(0.0, 1.0)  # l1 = z', l2 = x
    assert blend("addition", l1, l2, 0.5).flatten().tolist() == pytest.approx([0.5, 0.5])
    assert blend("slerp", l1, l2, 0.5).flatten().tolist() == pytest.approx([0.70711, 0.70711], abs=1e-5)
    out = blend("norm_only", _vec(2.0, 0.0), l2, 0.5)
    assert out.flatten().tolist() == pytest.approx([1.0, 1.0])


def test_blend_weight_convention_is_zprime_weight():
    zp, x = _vec(1.0, 0.0), _vec(0.0, 1.0)
    assert blend("addition", zp, x, 0.25).flatten().tolist() == pytest.approx([0.25, 0.75])
    s = blend("slerp", zp, x, 0.25).flatten().tolist()
    assert s == pytest.approx([math.sin(math.pi / 8), math.cos(math.pi / 8)])
    # norm_only: z' + (1 − w)(‖z'‖·x̂ − z') with z' = [2, 0], w = 0.25 → [0.5, 1.5]
    assert blend("norm_only", _vec(2.0, 0.0), x, 0.25).flatten().tolist() == pytest.approx([0.5, 1.5])


@pytest.mark.parametrize("name", BLENDS)
def test_blend_endpoints(name):
    zp, x = _latents(3, (2, 4, 5, 5))
    out0 = blend(name, zp, x, 0.0)
    assert torch.equal(out0, x)
    assert out0 is not x
    out1 = blend(name, zp, x, 1.0)
    assert torch.equal(out1, zp)
    assert out1.dtype == x.dtype


@pytest.mark.parametrize("name", BLENDS)
def test_blend_float_and_tensor_weight_identical(name):
    zp, x = _latents(4)
    a = blend(name, zp, x, 0.3)
    b = blend(name, zp, x, torch.tensor(0.3, dtype=torch.float64))
    assert torch.equal(a, b)
    c = blend(name, zp, x, 0.375)
    d = blend(name, zp, x, torch.tensor(0.375))  # float32 0-dim, exactly representable
    assert torch.equal(c, d)


@pytest.mark.parametrize("name", BLENDS)
def test_blend_nan_free_on_degenerate_inputs(name):
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    same = blend(name, x.clone(), x, 0.4)
    assert torch.isfinite(same).all()
    assert torch.allclose(same, x, atol=1e-6)
    parallel = blend(name, 2 * x, x, 0.5)
    assert torch.isfinite(parallel).all()
    anti = blend(name, -x, x, 0.5)
    assert torch.isfinite(anti).all()
    zeros = torch.zeros_like(x)
    assert torch.isfinite(blend(name, zeros, x, 0.5)).all()
    assert torch.isfinite(blend(name, x, zeros, 0.5)).all()
    assert torch.isfinite(blend(name, zeros, zeros, 0.5)).all()


def test_slerp_parallel_falls_back_to_linear():
    x = _vec(1.0, 2.0, 3.0)
    assert torch.allclose(blend("slerp", 3 * x, x, 0.5), blend("addition", 3 * x, x, 0.5))
    assert torch.allclose(blend("slerp", x, x, 0.5), x)


def test_slerp_per_batch_item():
    zp = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).reshape(2, 2, 1, 1)
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).reshape(2, 2, 1, 1)
    out = blend("slerp", zp, x, 0.5).reshape(2, 2)
    assert out[0].tolist() == pytest.approx([0.70711, 0.70711], abs=1e-5)
    assert out[1].tolist() == pytest.approx([1.0, 0.0])


def test_blend_broadcasts_batch_one_reference_and_keeps_dtype():
    zp, _ = _latents(6, (1, 4, 4, 4))
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(7)).half()
    for name in BLENDS:
        out = blend(name, zp, x, 0.5)
        assert out.shape == x.shape
        assert out.dtype == torch.float16
        assert torch.isfinite(out).all()


def test_blend_errors():
    zp, x = _latents(8)
    with pytest.raises(ArgumentError, match="blend"):
        blend("lerp", zp, x, 0.5)
    with pytest.raises(ArgumentError, match="w"):
        blend("addition", zp, x, 1.5)
    with pytest.raises(ArgumentError, match="w"):
        blend("addition", zp, x, float("nan"))
    with pytest.raises(ImgcondError, match="shape"):
        blend("addition", zp[:, :3], x, 0.5)


# ---------------------------------------------------------------------------------------------------------------
# mean/std matching and noise scaling
# ---------------------------------------------------------------------------------------------------------------


def test_match_mean_std_matches_statistics():
    x, ref = _latents(9)
    ref = ref * 3 + 1
    out = match_mean_std(x, ref)
    assert torch.allclose(out.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(out.std(dim=(2, 3), correction=0), ref.std(dim=(2, 3), correction=0), atol=1e-5)


def test_match_mean_std_constant_channel_no_nan():
    x, ref = _latents(10)
    x[:, 1] = 0.7
    ref[0, 2] = -2.0
    out = match_mean_std(x, ref)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 1].mean(dim=(1, 2)), ref[:, 1].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(out[:, 1], out[:, 1, :1, :1].expand_as(out[:, 1]))  # stays constant
    one = match_mean_std(torch.ones(1, 4, 1, 1), torch.zeros(1, 4, 1, 1))  # 1×1 latent
    assert torch.isfinite(one).all()


def test_noise_scaling_eps_and_flow():
    latent, noise = _latents(11)
    assert torch.allclose(noise_scaling(2.5, noise, latent, False), latent + 2.5 * noise)
    assert torch.allclose(noise_scaling(0.3, noise, latent, True), 0.3 * noise + 0.7 * latent)
    assert torch.allclose(noise_scaling(torch.tensor(0.3), noise, latent, True), 0.3 * noise + 0.7 * latent)
    sig = torch.tensor([0.2, 0.9])
    out = noise_scaling(sig, noise, latent, True)
    for b in range(2):
        assert torch.allclose(out[b], sig[b] * noise[b] + (1 - sig[b]) * latent[b])
    assert torch.equal(noise_scaling(1.0, noise, latent, True), noise)


# ---------------------------------------------------------------------------------------------------------------
# HiresMixer
# ---------------------------------------------------------------------------------------------------------------


def _mixer(params: MixParams | None = None, n: int = 10, **kw) -> tuple[HiresMixer, torch.Tensor]:
    sig = _sigmas(n)
    z_up, noise = _latents(12)
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
    z_up, noise = _latents(12)
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


def test_mixer_blend_max_zero_leaves_x_bitwise_equal():
    for schedule in SCHEDULES:
        m, sig = _mixer(MixParams(schedule=schedule, blend_max=0.0, normalize=True))
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
    z_up, noise = _latents(12)
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
    z_up, _ = _latents(12)
    g = torch.Generator().manual_seed(7 + 2)
    eps = torch.randn(z_up.shape, generator=g)
    assert torch.allclose(m1.zprime(2), z_up + float(sig[2]) * eps)
    with pytest.raises(ArgumentError, match="generator_seed"):
        _mixer(p, generator_seed=None)
    z_up, _ = _latents(12)
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
    z_up, noise = _latents(16)
    m = HiresMixer(MixParams(schedule="linear"), sig, z_up, noise, True, None)
    assert torch.allclose(m.zprime(1), 0.75 * noise + 0.25 * z_up)
    x = torch.zeros_like(z_up)
    assert m.mix_(x, 0.75)
    assert torch.allclose(x, m.weights[1] * (0.75 * noise + 0.25 * z_up))


def test_mixer_broadcasts_batch_one_reference_and_half_state():
    sig = _sigmas(5)
    z_up, noise = _latents(17, (1, 4, 8, 8))
    m = HiresMixer(MixParams(schedule="linear"), sig, z_up, noise, False, None)
    x = torch.randn(3, 4, 8, 8).half()
    assert m.mix_(x, float(sig[1]))
    assert x.dtype == torch.float16
    assert torch.isfinite(x).all()


def test_mixer_rejects_bad_construction():
    z_up, noise = _latents(18)
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


# ---------------------------------------------------------------------------------------------------------------
# SVG
# ---------------------------------------------------------------------------------------------------------------


def test_schedule_svg_well_formed_and_deterministic():
    w = zprime_weights(MixParams(), 20)
    svg = schedule_svg(w, title='DemoFusion <α=3> & "q"')
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    assert root.get("width") == "320"
    assert svg == schedule_svg(w, title='DemoFusion <α=3> & "q"')
    ns = "{http://www.w3.org/2000/svg}"
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert "0" in texts
    assert "1" in texts
    assert 'DemoFusion <α=3> & "q"' in texts
    poly = root.find(f"{ns}polyline")
    assert poly is not None
    assert len(poly.get("points").split()) == 20
    assert "<script" not in svg


@pytest.mark.parametrize("weights", [[], [0.5], [0.0, 1.0], [1.0] * 300])
def test_schedule_svg_edge_cases(weights):
    ET.fromstring(schedule_svg(weights, width=200, height=90))


def test_schedule_svg_rejects_bad_input():
    with pytest.raises(ArgumentError, match="weights"):
        schedule_svg([0.1, float("nan")])
    with pytest.raises(ArgumentError, match="width"):
        schedule_svg([0.1], width=10)
