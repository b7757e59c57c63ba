"""Unit tests for hires mixing's blends, mean/std matching and noise scaling (seeds-algorithms.md §3.8 vector 4, §7)."""

from __future__ import annotations

import math

import pytest
import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.mixing.blends import blend, match_mean_std, noise_scaling
from lib_imgcond.mixing.schedules import BLENDS
from tests.mixing_cases import latents, vec

# ---------------------------------------------------------------------------------------------------------------
# §3.8 vector 4 and blend properties
# ---------------------------------------------------------------------------------------------------------------


def test_blend_vector_4():
    l1, l2 = vec(1.0, 0.0), vec(0.0, 1.0)  # l1 = z', l2 = x
    assert blend("addition", l1, l2, 0.5).flatten().tolist() == pytest.approx([0.5, 0.5])
    assert blend("slerp", l1, l2, 0.5).flatten().tolist() == pytest.approx([0.70711, 0.70711], abs=1e-5)
    out = blend("norm_only", vec(2.0, 0.0), l2, 0.5)
    assert out.flatten().tolist() == pytest.approx([1.0, 1.0])


def test_blend_weight_convention_is_zprime_weight():
    zp, x = vec(1.0, 0.0), vec(0.0, 1.0)
    assert blend("addition", zp, x, 0.25).flatten().tolist() == pytest.approx([0.25, 0.75])
    s = blend("slerp", zp, x, 0.25).flatten().tolist()
    assert s == pytest.approx([math.sin(math.pi / 8), math.cos(math.pi / 8)])
    # norm_only: z' + (1 − w)(‖z'‖·x̂ − z') with z' = [2, 0], w = 0.25 → [0.5, 1.5]
    assert blend("norm_only", vec(2.0, 0.0), x, 0.25).flatten().tolist() == pytest.approx([0.5, 1.5])


@pytest.mark.parametrize("name", BLENDS)
def test_blend_endpoints(name):
    zp, x = latents(3, (2, 4, 5, 5))
    out0 = blend(name, zp, x, 0.0)
    if name == "norm_only":  # its continuous w = 0 end: x rescaled to ‖z'‖ (see test_norm_only_is_continuous)
        scale = zp.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
        assert torch.allclose(out0, x * scale[:, None, None, None], atol=1e-6)
    else:
        assert torch.equal(out0, x)
    assert out0 is not x
    out1 = blend(name, zp, x, 1.0)
    assert torch.equal(out1, zp)
    assert out1.dtype == x.dtype


@pytest.mark.parametrize("name", BLENDS)
def test_blend_float_and_tensor_weight_identical(name):
    zp, x = latents(4)
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
    x = vec(1.0, 2.0, 3.0)
    assert torch.allclose(blend("slerp", 3 * x, x, 0.5), blend("addition", 3 * x, x, 0.5))
    assert torch.allclose(blend("slerp", x, x, 0.5), x)


def test_slerp_per_batch_item():
    zp = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).reshape(2, 2, 1, 1)
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).reshape(2, 2, 1, 1)
    out = blend("slerp", zp, x, 0.5).reshape(2, 2)
    assert out[0].tolist() == pytest.approx([0.70711, 0.70711], abs=1e-5)
    assert out[1].tolist() == pytest.approx([1.0, 0.0])


def test_blend_broadcasts_batch_one_reference_and_keeps_dtype():
    zp, _ = latents(6, (1, 4, 4, 4))
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(7)).half()
    for name in BLENDS:
        out = blend(name, zp, x, 0.5)
        assert out.shape == x.shape
        assert out.dtype == torch.float16
        assert torch.isfinite(out).all()


def test_blend_errors():
    zp, x = latents(8)
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
    x, ref = latents(9)
    ref = ref * 3 + 1
    out = match_mean_std(x, ref)
    assert torch.allclose(out.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(out.std(dim=(2, 3), correction=0), ref.std(dim=(2, 3), correction=0), atol=1e-5)


def test_match_mean_std_constant_channel_no_nan():
    x, ref = latents(10)
    x[:, 1] = 0.7
    ref[0, 2] = -2.0
    out = match_mean_std(x, ref)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 1].mean(dim=(1, 2)), ref[:, 1].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(out[:, 1], out[:, 1, :1, :1].expand_as(out[:, 1]))  # stays constant
    one = match_mean_std(torch.ones(1, 4, 1, 1), torch.zeros(1, 4, 1, 1))  # 1×1 latent
    assert torch.isfinite(one).all()


def test_noise_scaling_eps_and_flow():
    latent, noise = latents(11)
    assert torch.allclose(noise_scaling(2.5, noise, latent, False), latent + 2.5 * noise)
    assert torch.allclose(noise_scaling(0.3, noise, latent, True), 0.3 * noise + 0.7 * latent)
    assert torch.allclose(noise_scaling(torch.tensor(0.3), noise, latent, True), 0.3 * noise + 0.7 * latent)
    sig = torch.tensor([0.2, 0.9])
    out = noise_scaling(sig, noise, latent, True)
    for b in range(2):
        assert torch.allclose(out[b], sig[b] * noise[b] + (1 - sig[b]) * latent[b])
    assert torch.equal(noise_scaling(1.0, noise, latent, True), noise)


def _hires_like_pair(sigma: float = 1.2):
    """x: a sampler state; z' = z_up + σ·ε: a noised reference of a clearly different norm (SDXL-sized latent)."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(1, 4, 64, 64, generator=g)
    zp = torch.randn(1, 4, 64, 64, generator=g) + sigma * torch.randn(1, 4, 64, 64, generator=g)
    return zp, x


def test_norm_only_is_continuous_at_both_ends():
    zp, x = _hires_like_pair()
    n_z, n_x = zp.norm().item(), x.norm().item()
    assert abs(n_z - n_x) > 30.0  # the norms differ a lot, so "x" and "x rescaled" are far apart
    rescaled = x * (n_z / n_x)
    assert (rescaled - x).norm().item() > 30.0  # the size of the old jump at w = 0
    # w = 0 is the limit w → 0⁺: x rescaled to ‖z'‖ (the original's c = 1), not x itself
    at0 = blend("norm_only", zp, x, 0.0)
    assert torch.allclose(at0, rescaled, atol=1e-5)
    assert (blend("norm_only", zp, x, 1e-7) - at0).abs().max().item() < 1e-5
    assert (blend("norm_only", zp, x, 1e-4) - at0).abs().max().item() < 1e-3
    # w = 1 is the limit w → 1⁻: z'
    assert torch.equal(blend("norm_only", zp, x, 1.0), zp)
    assert (blend("norm_only", zp, x, 1.0 - 1e-7) - zp).abs().max().item() < 1e-5
    # and in between it is the original's formula l1 + c·(‖l1‖·l2/‖l2‖ − l1), c = 1 − w
    for w in (0.1, 0.5, 0.9):
        c = 1.0 - w
        assert torch.allclose(blend("norm_only", zp, x, w), zp + c * (rescaled - zp), atol=1e-5)


def test_norm_only_zero_x_falls_back_to_addition_at_both_ends():
    zp, x = _hires_like_pair()
    zero = torch.zeros_like(x)
    assert torch.equal(blend("norm_only", zp, zero, 0.0), zero)
    assert torch.allclose(blend("norm_only", zp, zero, 0.3), 0.3 * zp)


def test_slerp_with_a_zero_vector_takes_the_orthogonal_limit():
    x = vec(0.0, 1.0)
    # the original (ComfyUI-Iterative-Mixer) gives 0.70711·x at w = ½; the old fallback to addition gave 0.5·x
    assert blend("slerp", vec(0.0, 0.0), x, 0.5).flatten().tolist() == pytest.approx([0.0, 0.70711], abs=1e-5)
    for w in (0.1, 0.3, 0.8):
        assert torch.allclose(blend("slerp", torch.zeros_like(x), x, w), math.cos(w * math.pi / 2) * x)
        assert torch.allclose(blend("slerp", x, torch.zeros_like(x), w), math.sin(w * math.pi / 2) * x)
    assert torch.equal(blend("slerp", torch.zeros_like(x), torch.zeros_like(x), 0.4), torch.zeros_like(x))


def test_slerp_zero_limit_is_continuous_along_a_random_direction():
    zp, x = _hires_like_pair()
    at_zero = blend("slerp", torch.zeros_like(zp), x, 0.5)
    for scale in (1e-3, 1e-8):
        tiny = blend("slerp", scale * zp, x, 0.5)  # z' shrinking toward 0 along a noise direction
        assert torch.allclose(tiny, at_zero, rtol=0, atol=0.02 * x.abs().max().item())
    assert not torch.allclose(at_zero, 0.5 * x, atol=0.1)
