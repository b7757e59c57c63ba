"""unCLIP on a real headless Forge 2.0 with a seeded random SD2.1-unclip-h checkpoint (tests/e2e/make_checkpoint.py:
SD2.1's UNet with the 2048-d ADM input, its text encoder and VAE, and a noise augmentor) and a reduced random
ViT-H/14 vision encoder (hidden 64, 1024-d projection) written by the test into models/imgcond/clip_vision.

Without a `y` the unCLIP UNet cannot run, so the invariants are: strength 0 and an empty window give the same
image (a zero `y`, the negative side's); enabled differs from both; equal requests give equal images; settings
change the result.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lib_imgcond.spec.families import REFDROP
from tests.e2e import forge
from tests.e2e.test_flexdiffuse import guidance_image, write_encoder

TITLE = "unclip"
ENCODER_H = "imgcond-test-unclip-vit-h.safetensors"
ENCODER_L = "imgcond-test-unclip-vit-l.safetensors"


@pytest.fixture(scope="module")
def encoders(unclip_server):
    folder = Path(unclip_server.data_dir) / "models" / "imgcond" / "clip_vision"
    write_encoder(folder, ENCODER_H, 1024, seed=21)
    write_encoder(folder, ENCODER_L, 768, seed=22)
    return folder


def conditioned(body: dict, **named) -> dict:
    return forge.with_script(body, TITLE, [{"encoder": ENCODER_H, **named}])


@pytest.fixture(scope="module")
def img():
    return guidance_image(8)


@pytest.fixture(scope="module")
def zero_y(unclip_server, encoders, img):
    return unclip_server.generate(conditioned(forge.payload(), image1=img, strength1=0.0))


def test_enabled_differs_from_a_zero_image_input_and_is_repeatable(unclip_server, encoders, img, zero_y):
    on = unclip_server.generate(conditioned(forge.payload(), image1=img))
    assert forge.max_diff(on.image, zero_y.image) > 0
    assert "unclip_enabled: True" in on.infotext and f"unclip_encoder: {ENCODER_H}" in on.infotext
    again = unclip_server.generate(conditioned(forge.payload(), image1=img))
    assert forge.max_diff(again.image, on.image) == 0


def test_empty_window_equals_strength_zero(unclip_server, encoders, img, zero_y):
    for start in (0.0, 0.5):
        out = unclip_server.generate(conditioned(forge.payload(), image1=img, start=start, end=start))
        assert forge.max_diff(out.image, zero_y.image) == 0, start
    late = unclip_server.generate(conditioned(forge.payload(), image1=img, start=0.5))
    assert forge.max_diff(late.image, zero_y.image) > 0


def test_settings_change_the_result(unclip_server, encoders, img, zero_y):
    base = unclip_server.generate(conditioned(forge.payload(), image1=img))
    variants = {
        "noise": conditioned(forge.payload(), image1=img, noise_augmentation1=0.6),
        "strength": conditioned(forge.payload(), image1=img, strength1=2.5),
        "two": conditioned(forge.payload(), image1=img, image2=guidance_image(9), strength2=0.7),
    }
    for name, body in variants.items():
        out = unclip_server.generate(body)
        assert forge.max_diff(out.image, base.image) > 0, name
        assert forge.max_diff(out.image, zero_y.image) > 0, name
    assert "unclip_merge_noise_augmentation: 0.05" in out.infotext
    hr = unclip_server.generate(conditioned(forge.payload(enable_hr=True), image1=img))
    assert hr.image.shape == (128, 128, 3)
    again = unclip_server.generate(conditioned(forge.payload(), image1=img, strength1=0.0))
    assert forge.max_diff(again.image, zero_y.image) == 0


def test_clear_errors_before_sampling(unclip_server, encoders, img):
    err = unclip_server.generate_error(conditioned(forge.payload(), image1=img, encoder=ENCODER_L))
    assert "768-d" in err and "1024-d projection" in err and "ViT-H/14" in err
    err = unclip_server.generate_error(conditioned(forge.payload(), image1=img, encoder="missing.safetensors"))
    assert "unCLIP: the encoder file 'missing.safetensors' (encoder) is not in" in err, err
    assert "CLIP image guidance" not in err and "flexdiffuse." not in err, err
    err = unclip_server.generate_error(conditioned(forge.payload()))
    assert "no image was given" in err
    err = unclip_server.generate_error(conditioned(forge.payload(), image1=img, start=0.7, end=0.2))
    assert "unclip.end" in err


def test_refdrop_refuses_the_sd2_family_by_name(unclip_server):
    """The real WebUI path of a family RefDrop does not support (an SD2.1 checkpoint): a clear error, no image."""
    body = forge.with_script(forge.payload(), "refdrop", [{"mode": "Record", "reference": "sd2"}])
    err = unclip_server.generate_error(body)
    assert "RefDrop needs a SD1.5, SDXL, Flux, Chroma" in err, err
    assert f"the loaded checkpoint is SD2.x: {REFDROP.reason('sd2')}" in err, err  # the family table's reason
