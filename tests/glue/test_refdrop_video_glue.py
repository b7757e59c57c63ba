"""RefDrop on Neo's Wan-VAE engines without the host: a Wan generation is one clip whose batch size counts frames
(its RAM estimate counts them, a batch item or mode Batch is refused), the Anima and Wan sites' image-token spans,
and mode Image encoding with the VAE alone (the engines' `encode_first_stage` changes their edit/video state)."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.host import video
from lib_imgcond.host.sites import registry as sites
from lib_imgcond.refdrop import forge_estimate as estimate
from lib_imgcond.refdrop import forge_refdrop as host
from tests.glue.fakes import FakeUnetPatcher
from tests.glue.test_refdrop_glue import VALUES

RECORD = {**VALUES, "mode": "Record", "record_every": 1}


@pytest.fixture
def neo(monkeypatch):
    """Neo's `backend.args.dynamic_args`, as its loader leaves it for a Wan model (`wan` True)."""
    args = types.ModuleType("backend.args")
    args.dynamic_args = type("dynamic_args", (), {"wan": True})
    backend = types.ModuleType("backend")
    backend.args = args
    monkeypatch.setitem(sys.modules, "backend", backend)
    monkeypatch.setitem(sys.modules, "backend.args", args)
    return args.dynamic_args


def wan_model(blocks=3, dim=64):
    return SimpleNamespace(blocks=[SimpleNamespace(self_attn=object()) for _ in range(blocks)], dim=dim,
                           patch_size=(1, 2, 2))  # fmt: skip


def engine(name="Wan", model=None, **attrs):
    cls = type(name, (), {"is_wan": True, **attrs})
    sd_model = cls()
    sd_model.forge_objects = SimpleNamespace(unet=FakeUnetPatcher(model or wan_model()))
    return sd_model


def p_of(sd_model, batch_size=1, **kw):
    p = SimpleNamespace(sd_model=sd_model, width=64, height=64, steps=3, sampler_name="", batch_size=batch_size,
                        enable_hr=False, seed=1, is_hr_pass=False, extra_generation_params={})  # fmt: skip
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def test_a_wan_generation_is_one_clip_whose_batch_size_counts_frames(neo):
    sd_model = engine()
    assert [video.clip_frames(p_of(sd_model, b)) for b in (1, 4, 5, 9)] == [1, 1, 2, 3]  # Neo: 4·(T − 1) + 1
    assert video.model_batch(p_of(sd_model, 9)) == 1
    neo.wan = False  # Anima, Qwen-Image: the Wan VAE, images
    assert video.clip_frames(p_of(sd_model, 9)) is None and video.model_batch(p_of(sd_model, 9)) == 9
    neo.wan = True
    assert video.clip_frames(p_of(SimpleNamespace(), 9)) is None  # no Wan VAE: never video


def test_the_record_estimate_counts_a_clips_frames(neo):
    sd_model = engine()
    one = host.estimate_record(p_of(sd_model, 1), RECORD, "as computed")
    assert one == 3 * 3 * 2 * 16 * 64 * 4  # 3 steps × 3 blocks × K and V × 4×4 tokens × 64 channels × fp32
    assert host.estimate_record(p_of(sd_model, 9), RECORD, "as computed") == 3 * one
    neo.wan = False
    assert host.estimate_record(p_of(sd_model, 9), RECORD, "as computed") == one  # images: a Record keeps one
    neo.wan = True
    line = estimate.record_size_line(sd_model, {"width": 64, "height": 64, "steps": 3, "batch_size": 9}, RECORD,
                                     "as computed")  # fmt: skip
    assert "a clip of 3 latent frames" in line


def test_a_clip_refuses_a_batch_item_and_mode_batch(neo):
    p = p_of(engine(), 9)
    with pytest.raises(ArgumentError, match=r"batch size 1 .*one clip"):
        host.plan(p, dict(RECORD, batch_item=1), 0, False)
    with pytest.raises(ImgcondError, match=r"mode Batch .*one clip"):
        host.plan(p, dict(VALUES, mode="Batch", rate=0.5, prompt_lines="", batch_sets=1), 0, False)
    assert host.plan(p, dict(RECORD), 0, False).family == "wan:3@64"


def test_the_sites_span_the_image_tokens_of_every_frame():
    anima = sites.site("anima")
    model = SimpleNamespace(patch_spatial=2, patch_temporal=1)
    x = torch.zeros(1, 16, 1, 9, 8)  # ⌈9/2⌉ = 5 rows: the host pads to the patch
    assert anima.span(model, x, 20) == (0, 20)
    assert anima.span(model, x, 40) == (0, 20)  # a reference latent's frame appended: context
    with pytest.raises(ImgcondError, match=r"Anima: .*12 tokens"):
        anima.span(model, x, 12)
    wan = sites.site("wan")
    x = torch.zeros(1, 16, 3, 9, 8)
    assert wan.span(wan_model(), x, 60) == (0, 60) and wan.span(wan_model(), x, 80) == (0, 60)
    with pytest.raises(ImgcondError, match=r"Wan: .*20 tokens"):
        wan.span(wan_model(), x, 20)


def test_image_mode_encodes_with_the_vae_alone_on_wan_vae_engines():
    calls = []

    class Vae:
        first_stage_model = SimpleNamespace(process_in=lambda s: s * 2)

        def encode(self, pixels):  # (B, H, W, 3) in [0, 1], as the engines pass it
            calls.append(tuple(pixels.shape))
            return torch.full((1, 16, 1, pixels.shape[1] // 8, pixels.shape[2] // 8), float(pixels.max()))

    def encode_first_stage(self, x):
        raise AssertionError("the engine's encode_first_stage sets its reference latent / first frame")

    sd_model = engine("Anima", encode_first_stage=encode_first_stage)
    sd_model.forge_objects.vae = Vae()
    latent = host.encode_image(p_of(sd_model, width=64, height=48), Image.new("RGB", (30, 20), (255, 0, 0)))
    assert calls == [(1, 48, 64, 3)] and latent.shape == (1, 16, 1, 6, 8)
    assert float(latent.max()) == 2.0  # [0, 1] pixels in, the engine's latent scaling applied
