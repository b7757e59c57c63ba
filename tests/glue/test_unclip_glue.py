"""unCLIP glue (unclip/forge_unclip + the spec) against fakes of Forge's documented API."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.flexdiffuse import forge_encoders
from lib_imgcond.spec.params import ImageInput
from lib_imgcond.unclip import conditioning as unclip
from lib_imgcond.unclip import forge_unclip as host
from lib_imgcond.unclip.spec import SLOTS, SPEC
from lib_imgcond.vision import transformer as vision
from tests.glue.fakes import FakeUnetPatcher, fake_models_dir
from tests.vision_states import clip_shapes, random_state


class FakeCondition:
    def __init__(self, cond):
        self.cond = cond


class StableDiffusion2:
    """The engine class name Forge 2.0 gives SD2.x (and SD2.1-unclip) checkpoints."""

    def __init__(self, filename, adm=2048, num_classes="sequential"):
        unet = FakeUnetPatcher(
            SimpleNamespace(num_classes=num_classes, label_emb=nn.Sequential(nn.Sequential(nn.Linear(adm, 4))))
        )
        unet.model.predictor = SimpleNamespace(percent_to_sigma=lambda p: 999.0 if p <= 0 else 10.0 * (1 - p))
        self.forge_objects = SimpleNamespace(unet=unet)
        self.filename = str(filename)


def augmentor_state(dim=1024):
    g = torch.Generator().manual_seed(3)
    return {
        "noise_augmentor.data_mean": torch.randn(1, dim, generator=g) * 0.1,
        "noise_augmentor.data_std": torch.full((1, dim), 0.8),
        "model.diffusion_model.out.2.bias": torch.zeros(4),
    }


@pytest.fixture(autouse=True)
def models(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    root = tmp_path / "models"
    fake_models_dir(monkeypatch, root)
    condition = types.ModuleType("backend.sampling.condition")
    condition.Condition = FakeCondition
    for name in ("backend", "backend.sampling"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "backend.sampling.condition", condition)
    forge_encoders.unload_encoders()
    ckpt = tmp_path / "sd21-unclip-h.safetensors"
    save_file(augmentor_state(), str(ckpt))
    folder = root / "imgcond" / "clip_vision"
    folder.mkdir(parents=True)
    save_file(random_state(clip_shapes(32, 1, 64, 14, 3, 1024), 1), str(folder / "h.safetensors"))
    save_file(random_state(clip_shapes(32, 1, 64, 14, 3, 768), 2), str(folder / "l.safetensors"))
    yield ckpt
    forge_encoders.unload_encoders()


def picture(seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageInput(Image.fromarray((torch.rand(40, 50, 3, generator=g) * 255).to(torch.uint8).numpy()))


def fake_p(ckpt, **kw):
    return SimpleNamespace(sd_model=StableDiffusion2(ckpt, **kw), all_seeds=[7], extra_generation_params={})


def values(**kw):
    return SPEC.parse([{"image1": picture(), **kw}])


def test_spec_layout():
    names = [p.name for p in SPEC.params]
    assert names[:4] == ["encoder", "merge_noise_augmentation", "start", "end"]
    assert names[4:7] == ["image1", "strength1", "noise_augmentation1"] and len(names) == 4 + 3 * SLOTS
    assert SPEC.title.lower() == "unclip" and {"start", "end", "strength1"} <= {p.name for p in SPEC.params if p.xyz}


def test_only_unclip_checkpoints(models):
    for engine in (StableDiffusion2(models, num_classes=None), SimpleNamespace(is_sd1=True)):
        with pytest.raises(ImgcondError, match=r"unCLIP needs an SD2\.1 unCLIP checkpoint"):
            host.plan(SimpleNamespace(sd_model=engine), values())
    with pytest.raises(ImgcondError, match="no image was given"):
        host.plan(fake_p(models), SPEC.parse([{}]))
    with pytest.raises(ArgumentError, match=r"unclip\.end"):
        host.plan(fake_p(models), values(start=0.5, end=0.1))


def test_encoder_must_match_the_tower(models, tmp_path):
    from safetensors.torch import save_file

    assert host.plan(fake_p(models), values()).encoder == "h.safetensors"  # Automatic: the 1024-d one
    with pytest.raises(ImgcondError, match=r"l\.safetensors is .* \(768-d\).*ViT-H/14 .*1024-d"):
        host.plan(fake_p(models), values(encoder="l.safetensors"))
    with pytest.raises(ImgcondError, match="the noise augmentor is 1024-d but the UNet takes 1536-d"):
        host.plan(fake_p(models, adm=1536), values())
    unclip_l = tmp_path / "sd21-unclip-l.safetensors"
    save_file(augmentor_state(768), str(unclip_l))
    assert host.plan(fake_p(unclip_l, adm=1536), values()).encoder == "l.safetensors"  # an -l checkpoint


def test_a_checkpoint_without_noise_augmentor(models, tmp_path):
    from safetensors.torch import save_file

    bare = tmp_path / "v2-1.safetensors"
    save_file({"x": torch.zeros(1)}, str(bare))
    with pytest.raises(ImgcondError, match=r"v2-1\.safetensors has no unCLIP noise augmentor"):
        host.plan(fake_p(bare), values())


def test_y_is_the_core_adm_of_the_image_embeds(models):
    job = host.plan(fake_p(models), values(strength1=0.5, noise_augmentation1=0.3))
    model = vision.load_vision_model(random_state(clip_shapes(32, 1, 64, 14, 3, 1024), 1))
    embeds = model.encode(forge_encoders.image_tensor(picture())).image_embeds
    aug = unclip.noise_augmentor(augmentor_state())
    expected = unclip.adm(aug, [(embeds, 0.5, 0.3)], torch.Generator().manual_seed(7))
    assert job.y.shape == (1, 2048) and torch.allclose(job.y, expected, atol=1e-5)
    zero = host.plan(fake_p(models), values(strength1=0.0))
    assert torch.equal(zero.y, torch.zeros(1, 2048))


def test_modifier_gives_cond_y_in_the_window_and_uncond_zero(models):
    job = host.plan(fake_p(models), values(start=0.2, end=0.6))  # sigma 8 … 4
    unet = FakeUnetPatcher()
    unet.model.predictor = SimpleNamespace(percent_to_sigma=lambda p: 999.0 if p <= 0 else 10.0 * (1 - p))
    host.install(unet, job)
    (mod,) = unet.model_options["conditioning_modifiers"]

    def entry():
        return {"model_conds": {"c_crossattn": FakeCondition(torch.zeros(2, 77, 1024))}}

    x = torch.zeros(2, 4, 8, 8)
    cond_in, uncond_in = [entry()], [entry()]
    out = mod("model", x, torch.tensor([5.0]), uncond_in, cond_in, 7.0, {}, 1)
    y_cond, y_uncond = out[4][0]["model_conds"]["y"].cond, out[3][0]["model_conds"]["y"].cond
    assert (
        y_cond.shape == (2, 2048) and torch.equal(y_cond[1], job.y[0]) and torch.equal(y_uncond, torch.zeros(2, 2048))
    )
    assert "y" not in cond_in[0]["model_conds"]  # the caller's dicts are not edited
    outside = mod("model", x, torch.tensor([9.0]), None, [entry()], 1.0, {}, 1)
    assert torch.equal(outside[4][0]["model_conds"]["y"].cond, torch.zeros(2, 2048)) and outside[3] is None


def test_infotext_used_slots_only(models):
    job = host.plan(fake_p(models), values(image2=picture(1), strength2=0.4))
    info = host.infotext(job, SPEC)
    assert info["unclip_encoder"] == "h.safetensors" and info["unclip_strength2"] == 0.4
    assert "unclip_strength3" not in info and info["unclip_merge_noise_augmentation"] == 0.05
    assert "unclip_merge_noise_augmentation" not in host.infotext(host.plan(fake_p(models), values()), SPEC)
