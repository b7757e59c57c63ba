"""The extension loads cleanly and changes nothing while no technique is enabled."""

from __future__ import annotations

from tests.e2e import forge


def test_extension_loads_without_errors(server):
    from lib_imgcond import __version__

    assert server.get("/imgcond/v1/version") == {"version": __version__}
    techniques = server.get("/imgcond/v1/techniques")
    titles = server.get("/sdapi/v1/scripts")
    for spec in techniques.values():
        assert spec["alwayson_key"] in titles["txt2img"]
    assert not server.extension_tracebacks(expected=(), text=server.startup_log())


def test_disabled_txt2img_identical_to_no_extension(server, baseline):
    out = server.generate(forge.payload())
    assert forge.max_diff(out.image, baseline["txt2img"]) == 0


def test_disabled_img2img_identical_to_no_extension(server, baseline):
    out = server.generate(forge.payload(init_images=[baseline["init"]], denoising_strength=0.6), mode="img2img")
    assert forge.max_diff(out.image, baseline["img2img"]) == 0


def test_disabled_hires_identical_to_no_extension(server, baseline):
    out = server.generate(forge.payload(enable_hr=True))
    assert out.image.shape == (128, 128, 3)
    assert forge.max_diff(out.image, baseline["hires"]) == 0


def test_same_seed_twice_is_identical(server):
    a = server.generate(forge.payload(seed=7))
    b = server.generate(forge.payload(seed=7))
    assert forge.max_diff(a.image, b.image) == 0
    c = server.generate(forge.payload(seed=8))
    assert forge.max_diff(a.image, c.image) > 0
