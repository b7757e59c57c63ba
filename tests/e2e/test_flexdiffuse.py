"""CLIP image guidance (FlexDiffuse) against a real headless Forge (random SD1.5 weights, CPU).

The CLIP vision encoders are made here, with seeded random weights in the Hugging Face CLIPVisionModelWithProjection
key layout, straight into the server's models/imgcond/clip_vision folder. They are reduced in size (hidden 64,
2 layers) but keep ViT-L/14's patch 14, 224 px input (257 tokens) and its 768-d projection.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.e2e import forge, webui

TITLE = "clip image guidance"
ENCODER_L = "imgcond-test-vit-l.safetensors"
ENCODER_H = "imgcond-test-vit-h.safetensors"
ENCODER_G = "imgcond-test-vit-bigg.safetensors"
SHARED_L = "imgcond-test-shared-vit-l.safetensors"
PREPROCESSOR_L = "imgcond-test-preprocessor-vit-l.safetensors"
ZERO = {"threshold_mult": 0.0, "linear_start": 0.0, "linear_end": 0.0, "clustered": 0.0}


def clip_vision_state(proj: int, seed: int, hidden: int = 64, layers: int = 2, mlp: int = 256, grid: int = 16):
    """Seeded random CLIPVisionModelWithProjection tensors (patch 14, image 224 → 1 + 16² tokens)."""
    from tests.vision_states import clip_shapes, random_state

    return random_state(clip_shapes(hidden, layers, mlp, 14, grid, proj), seed, scale=0.1)


def write_encoder(folder: Path, name: str, proj: int, seed: int) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if not path.exists():
        save_file(clip_vision_state(proj, seed), str(path))
    return path


def guidance_image(seed: int, size: int = 64) -> str:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1).astype(np.int16)
    img += rng.integers(-40, 40, img.shape)
    return forge.encode(np.clip(img, 0, 255).astype(np.uint8))


def guided(body: dict, *positional, **named) -> dict:
    return forge.with_script(body, TITLE, list(positional) if positional else [named])


@pytest.fixture(scope="module")
def encoders(server):
    folder = Path(server.data_dir) / "models" / "imgcond" / "clip_vision"
    write_encoder(folder, ENCODER_L, 768, seed=1)
    write_encoder(folder, ENCODER_H, 1024, seed=2)
    return folder


@pytest.fixture(scope="module")
def img():
    return guidance_image(1)


@pytest.fixture(scope="module")
def enabled(server, encoders, img):
    return server.generate(guided(forge.payload(), image=img, encoder=ENCODER_L))


def test_multipliers_zero_is_pixel_identical_to_off(server, encoders, img, baseline):
    out = server.generate(guided(forge.payload(), image=img, **ZERO))
    assert forge.max_diff(out.image, baseline["txt2img"]) == 0
    assert "flexdiffuse_enabled: True" in out.infotext and f"flexdiffuse_encoder: {ENCODER_L}" in out.infotext


def test_enabled_changes_the_image_and_does_not_leak(server, enabled, baseline):
    assert forge.max_diff(enabled.image, baseline["txt2img"]) > 0
    info = enabled.infotext
    assert "flexdiffuse_linear_end: 0.5" in info and "flexdiffuse_max_guidance: 0.35" in info
    assert "flexdiffuse_priority: Best fit" in info and "flexdiffuse_compatible: False" in info
    again = server.generate(forge.payload())
    assert forge.max_diff(again.image, baseline["txt2img"]) == 0


def test_empty_step_window_is_pixel_identical_to_off(server, enabled, img, baseline):
    """A window [s, s] never guides (tested per model evaluation from its sigma), also in the hires pass."""
    for start in (0.0, 0.5):
        out = server.generate(guided(forge.payload(), image=img, start=start, end=start))
        assert forge.max_diff(out.image, baseline["txt2img"]) == 0, start
    hr = server.generate(guided(forge.payload(enable_hr=True), image=img, start=0.0, end=0.0))
    assert forge.max_diff(hr.image, baseline["hires"]) == 0
    again = server.generate(forge.payload())
    assert forge.max_diff(again.image, baseline["txt2img"]) == 0


def test_positional_args_match_named_args(server, enabled, img):
    positional = server.generate(guided(forge.payload(), True, img, 1.0, None, 1.0, ENCODER_L))
    assert forge.max_diff(positional.image, enabled.image) == 0


def test_settings_change_the_result(server, enabled, img, baseline):
    results = {
        "compatible": guided(forge.payload(), image=img, compatible=True),
        "text_order": guided(forge.payload(), image=img, priority="Text order", reuse=False),
        "concept": guided(forge.payload(), image=img, concept="cat", concept_threshold=0.0),
        "direct": guided(forge.payload(), image=img, direct=True),
        "window": guided(forge.payload(), image=img, start=0.5),
        "two_images": guided(forge.payload(), image=img, image2=guidance_image(2), weight2=0.7),
        "list": guided(forge.payload(), image=img, images=[{"image": guidance_image(3), "weight": 0.5}]),
    }
    images = {}
    for name, body in results.items():
        out = server.generate(body)
        images[name] = out.image
        assert forge.max_diff(out.image, baseline["txt2img"]) > 0, name
        assert forge.max_diff(out.image, enabled.image) > 0, name
    assert "flexdiffuse_images: 1" in out.infotext
    assert forge.max_diff(images["direct"], images["concept"]) > 0


def test_img2img_and_hires(server, encoders, img, baseline):
    i2i = dict(init_images=[baseline["init"]], denoising_strength=0.6)
    zero = server.generate(guided(forge.payload(**i2i), image=img, **ZERO), mode="img2img")
    assert forge.max_diff(zero.image, baseline["img2img"]) == 0
    on = server.generate(guided(forge.payload(**i2i), image=img), mode="img2img")
    assert forge.max_diff(on.image, baseline["img2img"]) > 0
    hr_zero = server.generate(guided(forge.payload(enable_hr=True), image=img, **ZERO))
    assert forge.max_diff(hr_zero.image, baseline["hires"]) == 0
    hr_on = server.generate(guided(forge.payload(enable_hr=True), image=img))
    hr_first_only = server.generate(guided(forge.payload(enable_hr=True), image=img, hires=False))
    assert hr_on.image.shape == (128, 128, 3)
    assert forge.max_diff(hr_on.image, baseline["hires"]) > 0
    assert forge.max_diff(hr_on.image, hr_first_only.image) > 0


def test_clear_errors_before_sampling(server, encoders, img, baseline):
    err = server.generate_error(guided(forge.payload(), image=img, encoder=ENCODER_H))
    assert "1024-d projection" in err and "SD1.5 is 768-d" in err and "ViT-L/14" in err
    err = server.generate_error(guided(forge.payload(), image=img, encoder="missing.safetensors"))
    assert "CLIP image guidance: the encoder file 'missing.safetensors' (encoder) is not in" in err, err
    assert os.path.join("imgcond", "clip_vision") in err
    err = server.generate_error(guided(forge.payload()))
    assert "no guidance image was given" in err
    err = server.generate_error(guided(forge.payload(), image=img, max_guidance=2))
    assert "flexdiffuse.max_guidance=2" in err and "[0, 1]" in err
    err = server.generate_error(guided(forge.payload(), image=img, imagez=1))
    assert "flexdiffuse.imagez" in err
    again = server.generate(forge.payload())
    assert forge.max_diff(again.image, baseline["txt2img"]) == 0


def test_encoder_from_the_shared_clip_vision_folder(server, encoders, img, enabled):
    """A file in models/clip_vision (where users keep encoders for IP-Adapter and the like) is listed and used; the same
    weights as ENCODER_L under another name give the very same image. One in a subfolder of
    models/ControlNetPreprocessor is listed too."""
    models = Path(server.data_dir) / "models"
    write_encoder(models / "clip_vision", SHARED_L, 768, seed=1)
    write_encoder(models / "ControlNetPreprocessor" / "clip_vision", PREPROCESSOR_L, 768, seed=1)
    listed = server.get("/imgcond/v1/flexdiffuse/encoders")
    assert SHARED_L in listed["files"] and PREPROCESSOR_L in listed["files"]
    assert [Path(f).name for f in listed["folders"]][-2:] == ["clip_vision", "ControlNetPreprocessor"]
    out = server.generate(guided(forge.payload(), image=img, encoder=SHARED_L))
    assert f"flexdiffuse_encoder: {SHARED_L}" in out.infotext
    assert forge.max_diff(out.image, enabled.image) == 0


def test_routes(server, encoders):
    listed = server.get("/imgcond/v1/flexdiffuse/encoders")
    assert ENCODER_L in listed["files"] and ENCODER_H in listed["files"]
    techniques = server.get("/imgcond/v1/techniques")
    assert techniques["flexdiffuse"]["alwayson_key"] == TITLE


@pytest.mark.sdxl
@pytest.mark.skipif(os.environ.get("IMGCOND_E2E_SDXL") != "1", reason="set IMGCOND_E2E_SDXL=1 (needs ~19 GB RAM)")
def test_sdxl_two_encoders(tmp_path):
    webui.stop_all()  # the SDXL tests run last (conftest): make room for the ~19 GB server
    srv = webui.ForgeServer(forge.checkpoint("sdxl"), with_extension=True).start()
    try:
        folder = Path(srv.data_dir) / "models" / "imgcond" / "clip_vision"
        body = forge.payload(width=128, height=128, steps=2)
        plain = srv.generate(body)
        err = srv.generate_error(guided(body, image=guidance_image(1)))
        assert "ViT-L/14 vision encoder (768-d projection) for SDXL" in err
        write_encoder(folder, ENCODER_L, 768, seed=1)
        err = srv.generate_error(guided(body, image=guidance_image(1)))
        assert "ViT-bigG/14 vision encoder (1280-d projection) for SDXL" in err
        write_encoder(folder, ENCODER_G, 1280, seed=3)
        zero = srv.generate(guided(body, image=guidance_image(1), **ZERO))
        assert forge.max_diff(zero.image, plain.image) == 0
        on = srv.generate(guided(body, image=guidance_image(1), concept="cat", concept_threshold=0.0))
        assert forge.max_diff(on.image, plain.image) > 0
        assert f"flexdiffuse_encoder_g: {ENCODER_G}" in on.infotext
        assert not srv.extension_tracebacks()
        assert not srv.nan_lines()
    finally:
        srv.cleanup()
