"""unCLIP's ADM input (unclip.conditioning) with small noise augmentors in the checkpoint's key layout."""

from __future__ import annotations

import math

import pytest
import torch

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.unclip import conditioning as unclip


def checkpoint(dim=4, alphas=None, mean=0.5, std=2.0):
    """The `noise_augmentor.*` tensors of an SD2.1-unclip checkpoint (plus a UNet key, which is ignored)."""
    out = {
        "noise_augmentor.data_mean": torch.full((1, dim), mean),
        "noise_augmentor.data_std": torch.full((1, dim), std),
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 2 * dim),
    }
    if alphas is not None:
        out["noise_augmentor.alphas_cumprod"] = torch.tensor(alphas, dtype=torch.float32)
    return out


def test_squaredcos_schedule_by_hand():
    acp = unclip.squaredcos_alphas_cumprod()

    def f(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    assert acp.shape == (1000,) and acp.dtype == torch.float64
    assert acp[0].item() == pytest.approx(f(0.001) / f(0.0), rel=1e-12)
    assert acp[499].item() == pytest.approx(f(0.5) / f(0.0), rel=1e-9)  # telescoping product below the cap
    assert bool((acp[1:] < acp[:-1]).all()) and acp[-1].item() < 1e-6  # the last beta is capped at 0.999


def test_level_embedding_by_hand():
    emb = unclip.level_embedding(torch.tensor([0, 3]), 4)
    assert emb[0].tolist() == [1.0, 1.0, 0.0, 0.0]
    expected = [math.cos(3.0), math.cos(0.03), math.sin(3.0), math.sin(0.03)]  # frequencies 1 and 10000^(-1/2)
    assert emb[1].tolist() == pytest.approx(expected, abs=1e-6)
    assert unclip.level_of(0.0) == 0 and unclip.level_of(1.0) == 999 and unclip.level_of(0.25) == 250


def test_augmentation_uses_the_checkpoints_statistics_and_schedule():
    aug = unclip.noise_augmentor(checkpoint(alphas=[1.0, 0.25, 0.0]))
    e = torch.tensor([[1.0, -1.0, 3.0, 0.5]])
    out = aug(e, 0, torch.Generator().manual_seed(1))
    assert torch.allclose(out[:, :4], e) and out[0, 4:].tolist() == [1.0, 1.0, 0.0, 0.0]  # ᾱ = 1: no noise
    n = torch.randn((1, 4), generator=torch.Generator().manual_seed(2))
    out = aug(e, 1, torch.Generator().manual_seed(2))
    # ᾱ = 1/4: (½·(e − 0.5)/2 + (√3/2)·n)·2 + 0.5
    expected = (0.5 * (e - 0.5) / 2.0 + math.sqrt(0.75) * n) * 2.0 + 0.5
    assert torch.allclose(out[:, :4], expected, atol=1e-6)
    out = aug(e, 2, torch.Generator().manual_seed(2))
    assert torch.allclose(out[:, :4], n * 2.0 + 0.5, atol=1e-6)  # ᾱ = 0: pure noise at the data's scale
    with pytest.raises(ImgcondError, match="noise level 3 outside 0…2"):
        aug(e, 3, torch.Generator())
    with pytest.raises(ImgcondError, match=r"expects \(B, 4\)"):
        aug(torch.zeros(1, 3), 0, torch.Generator())


def test_schedule_defaults_to_squaredcos_when_not_stored():
    aug = unclip.noise_augmentor(checkpoint())
    assert torch.equal(aug.alphas_cumprod, unclip.squaredcos_alphas_cumprod()) and aug.dim == 4


def test_several_images_are_summed_then_merged_at_the_merge_level():
    aug = unclip.noise_augmentor(checkpoint(alphas=[1.0, 0.5]))
    e1, e2 = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[0.0, -1.0, 0.0, 1.0]])
    one = unclip.adm(aug, [(e1, 0.5, 0.0)], torch.Generator().manual_seed(0))
    assert torch.allclose(one, 0.5 * torch.tensor([[1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 0.0, 0.0]]))  # strength × [e, emb]
    two = unclip.adm(aug, [(e1, 0.5, 0.0), (e2, 2.0, 0.0)], torch.Generator().manual_seed(0), merge_level=0.0)
    assert torch.allclose(two, torch.tensor([[0.5, -1.0, 1.5, 4.0, 1.0, 1.0, 0.0, 0.0]]))  # new level embedding
    with pytest.raises(ImgcondError, match="no image"):
        unclip.adm(aug, [], torch.Generator())


def test_a_checkpoint_without_noise_augmentor_is_refused():
    with pytest.raises(ImgcondError, match=r"not an SD2\.1 unCLIP checkpoint"):
        unclip.noise_augmentor({"model.diffusion_model.x": torch.zeros(1)}, "v2-1_768.safetensors")
    with pytest.raises(ImgcondError, match="malformed"):
        unclip.noise_augmentor(checkpoint(std=0.0))
