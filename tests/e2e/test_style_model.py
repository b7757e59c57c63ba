"""Style model (T2I-Adapter style) against a real headless Forge (random SD1.5 weights, CPU).

The test writes its own seeded random files into the server's models folder: a reduced CLIP ViT-L/14 vision encoder
(hidden 64, 2 layers, patch 14, 224 px, 768-d projection) in models/imgcond/clip_vision, and a style adapter in the
T2I-Adapter key layout of the same width (8 tokens, 3 blocks, 768-d output) in models/imgcond/style.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e import forge
from tests.e2e.test_flexdiffuse import guidance_image, write_encoder

TITLE = "style model"
ENCODER = "imgcond-test-style-vit-l.safetensors"
ADAPTER = "imgcond-test-style.safetensors"


def adapter_state(seed: int = 7, width: int = 64) -> dict:
    import torch

    from tests.vision_states import random_state, style_adapter_shapes

    state = random_state(style_adapter_shapes(width, 8, 3, 768), seed, scale=0.1)
    for key in state:
        if "ln_" in key and key.endswith(".weight"):
            state[key] = torch.ones_like(state[key])
    state["proj"] = state["proj"] * 20.0  # tokens about as large as a prompt's
    return state


@pytest.fixture(scope="module")
def files(server):
    import torch
    from safetensors.torch import save_file

    models = Path(server.data_dir) / "models"
    write_encoder(models / "imgcond" / "clip_vision", ENCODER, 768, seed=11)
    style = models / "imgcond" / "style"
    style.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(), str(style / ADAPTER))
    torch.save({"state_dict": adapter_state(), "step": 1}, str(style / "imgcond-test-nested.pth"))
    return models


def styled(body: dict, **named) -> dict:
    return forge.with_script(body, TITLE, [{"encoder": ENCODER, "adapter": ADAPTER, **named}])


@pytest.fixture(scope="module")
def img():
    return guidance_image(5)


@pytest.fixture(scope="module")
def enabled(server, files, img):
    return server.generate(styled(forge.payload(), image1=img))


def test_weight_zero_is_pixel_identical_to_off(server, files, img, baseline):
    out = server.generate(styled(forge.payload(), image1=img, weight1=0.0))
    assert forge.max_diff(out.image, baseline["txt2img"]) == 0
    assert "style_model_" not in out.infotext  # nothing applied, nothing written


def test_enabled_changes_the_image_and_does_not_leak(server, enabled, baseline):
    assert forge.max_diff(enabled.image, baseline["txt2img"]) > 0
    info = enabled.infotext
    assert "style_model_enabled: True" in info and f"style_model_adapter: {ADAPTER}" in info
    assert f"style_model_encoder: {ENCODER}" in info and "style_model_weight1: 1.0" in info
    assert "style_model_weight2" not in info
    again = server.generate(forge.payload())
    assert forge.max_diff(again.image, baseline["txt2img"]) == 0


def test_empty_step_window_is_pixel_identical_to_off(server, enabled, img, baseline):
    for start in (0.0, 0.5):
        out = server.generate(styled(forge.payload(), image1=img, start=start, end=start))
        assert forge.max_diff(out.image, baseline["txt2img"]) == 0, start
    late = server.generate(styled(forge.payload(), image1=img, start=0.5))
    assert forge.max_diff(late.image, baseline["txt2img"]) > 0 and forge.max_diff(late.image, enabled.image) > 0
    again = server.generate(forge.payload())
    assert forge.max_diff(again.image, baseline["txt2img"]) == 0


def test_strength_types_and_a_second_image(server, enabled, img, baseline):
    bias = server.generate(styled(forge.payload(), image1=img, strength_type="attn_bias", strength=3.0))
    assert forge.max_diff(bias.image, baseline["txt2img"]) > 0 and forge.max_diff(bias.image, enabled.image) > 0
    two = server.generate(styled(forge.payload(), image1=img, image2=guidance_image(6), weight2=0.5))
    assert forge.max_diff(two.image, enabled.image) > 0 and "style_model_weight2: 0.5" in two.infotext
    again = server.generate(forge.payload())
    assert forge.max_diff(again.image, baseline["txt2img"]) == 0


def test_img2img_and_hires(server, files, img, baseline):
    i2i = dict(init_images=[baseline["init"]], denoising_strength=0.6)
    zero = server.generate(styled(forge.payload(**i2i), image1=img, weight1=0.0), mode="img2img")
    assert forge.max_diff(zero.image, baseline["img2img"]) == 0
    on = server.generate(styled(forge.payload(**i2i), image1=img), mode="img2img")
    assert forge.max_diff(on.image, baseline["img2img"]) > 0
    hr_empty = server.generate(styled(forge.payload(enable_hr=True), image1=img, start=0.3, end=0.3))
    assert forge.max_diff(hr_empty.image, baseline["hires"]) == 0
    hr_on = server.generate(styled(forge.payload(enable_hr=True), image1=img))
    assert forge.max_diff(hr_on.image, baseline["hires"]) > 0


def test_clear_errors_before_sampling(server, files, img, baseline):
    err = server.generate_error(styled(forge.payload(), image1=img, adapter="missing.safetensors"))
    assert "'missing.safetensors' is not in" in err and os.path.join("imgcond", "style") in err and "ControlNet" in err
    err = server.generate_error(styled(forge.payload(), image1=img, adapter="imgcond-test-nested.pth"))
    assert "imgcond-test-nested.pth is not a plain state dict of tensors" in err
    err = server.generate_error(styled(forge.payload(), image1=img, encoder="missing.safetensors"))
    assert "Style model: the encoder file 'missing.safetensors' (encoder) is not in" in err, err
    assert "CLIP image guidance" not in err and "flexdiffuse." not in err, err
    err = server.generate_error(styled(forge.payload()))
    assert "no style image was given" in err
    err = server.generate_error(styled(forge.payload(), image1=img, start=0.6, end=0.5))
    assert "style_model.end" in err
    listed = server.get("/imgcond/v1/style_model/files")
    assert ADAPTER in listed["adapters"] and ENCODER in listed["encoders"]
    again = server.generate(forge.payload())
    assert forge.max_diff(again.image, baseline["txt2img"]) == 0
