"""Redux control against a real headless Forge (random SD1.5 weights, CPU): it must refuse non-Flux models with a
clear message before sampling, and change nothing while disabled. The Flux paths are covered through Forge's own
backend in test_redux_flux_backend.py."""

from __future__ import annotations

import numpy as np

from tests.e2e import forge

TITLE = "redux control"


def redux(body: dict, args) -> dict:
    return forge.with_script(body, TITLE, args)


def reference_b64(seed: int = 3) -> str:
    rng = np.random.default_rng(seed)
    return forge.encode(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def test_listed_with_its_arguments(server):
    spec = server.get("/imgcond/v1/techniques")["redux"]
    assert spec["alwayson_key"] == TITLE
    names = [a["name"] for a in spec["args"]]
    assert names[:5] == ["enabled", "siglip", "redux_model", "start", "end"]
    assert {"image4", "factor4", "weight4", "strength_type4"} <= set(names)


def test_enabled_on_sd15_gives_clear_error(server):
    err = server.generate_error(redux(forge.payload(), [{"image1": reference_b64()}]))
    assert "Redux needs a Flux or Chroma model" in err and "SD1.5" in err
    err = server.generate_error(redux(forge.payload(), [{"images": [{"image": reference_b64(), "factor": 2.5}]}]))
    assert "Redux needs a Flux or Chroma model" in err


def test_argument_errors_name_the_argument(server):
    err = server.generate_error(redux(forge.payload(), [{"image1": reference_b64(), "factor1": 12}]))
    assert "redux.factor1=12" in err and "[1, 9]" in err
    err = server.generate_error(redux(forge.payload(), [{"image1": reference_b64(), "strength_type1": "add"}]))
    assert "redux.strength_type1" in err and "attn_bias" in err


def test_disabled_is_identical_to_no_extension(server, baseline):
    out = server.generate(redux(forge.payload(), [False]))
    assert forge.max_diff(out.image, baseline["txt2img"]) == 0
    out = server.generate(redux(forge.payload(), [{"enabled": False, "image1": reference_b64()}]))
    assert forge.max_diff(out.image, baseline["txt2img"]) == 0
    assert "redux_" not in out.infotext
    body = forge.payload(init_images=[baseline["init"]], denoising_strength=0.6)
    out = server.generate(redux(body, [False]), mode="img2img")
    assert forge.max_diff(out.image, baseline["img2img"]) == 0


def test_no_leak_after_an_error(server, baseline):
    server.generate_error(redux(forge.payload(), [{"image1": reference_b64()}]))
    out = server.generate(forge.payload())
    assert forge.max_diff(out.image, baseline["txt2img"]) == 0
