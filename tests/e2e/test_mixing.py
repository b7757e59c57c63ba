"""Hires iterative mixing against a real headless Forge (random SD1.5 weights, CPU)."""

from __future__ import annotations

import pytest

from tests.e2e import forge

TITLE = "hires iterative mixing"


def hrmix(body: dict, **args) -> dict:
    return forge.with_script(body, TITLE, [args])


def hires(**kw) -> dict:
    return forge.payload(enable_hr=True, **kw)


def test_blend_max_zero_is_plain_hires_fix(server, baseline):
    out = server.generate(hrmix(hires(), blend_max=0.0))
    assert forge.max_diff(out.image, baseline["hires"]) == 0


def test_enabled_changes_the_hires_image_without_leaking(server, baseline):
    out = server.generate(hrmix(hires(), alpha=1.0))
    assert out.image.shape == (128, 128, 3)
    assert forge.max_diff(out.image, baseline["hires"]) > 0
    assert "hrmix_enabled: True" in out.infotext
    assert "hrmix_alpha: 1.0" in out.infotext and "hrmix_schedule: demofusion_cosine" in out.infotext
    again = server.generate(hires())
    assert forge.max_diff(again.image, baseline["hires"]) == 0  # nothing left behind on the server
    assert "hrmix" not in again.infotext


def test_hires_fix_off_changes_nothing(server, baseline):
    out = server.generate(hrmix(forge.payload(), alpha=1.0, blend_min=0.5))
    assert forge.max_diff(out.image, baseline["txt2img"]) == 0
    assert "hrmix" not in out.infotext


def test_positional_args_match_named_args(server):
    named = server.generate(hrmix(hires(), schedule="linear", alpha=2.0))
    positional = server.generate(forge.with_script(hires(), TITLE, [True, "linear", 2.0]))
    assert forge.max_diff(named.image, positional.image) == 0


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos", "None"])
@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "Heun"])
def test_samplers_and_upscalers(server, sampler, upscaler):
    if upscaler != "None" and forge.is_neo():
        pytest.skip(f"Forge Neo has no '{upscaler}' upscaler (no latent upscalers, no Lanczos/Nearest); 'None' runs")
    body = hires(hr_sampler_name=sampler, hr_upscaler=upscaler)
    plain = server.generate(body)
    mixed = server.generate(hrmix(body, schedule="im_cosine", alpha=1.0))
    assert mixed.image.shape == plain.image.shape == (128, 128, 3)
    assert forge.max_diff(mixed.image, plain.image) > 0
    assert "hrmix_enabled: True" in mixed.infotext


def test_every_option_runs_and_batches(server, baseline):
    body = hires(batch_size=2)
    out = server.generate(
        hrmix(
            body,
            schedule="logistic",
            alpha=1.5,
            start=0.0,
            stop=1.5,
            clamp=1.0,
            blend_min=0.2,
            blend_max=0.8,
            blend="slerp",
            normalize=True,
            fresh_noise=True,
        )
    )
    assert len(out.images) == 2
    assert forge.max_diff(out.images[0], baseline["hires"]) > 0
    norm = server.generate(hrmix(hires(), blend="norm_only", blend_min=0.3))
    assert forge.max_diff(norm.image, baseline["hires"]) > 0
    assert "hrmix_blend: norm_only" in norm.infotext


def test_unsupported_sampler_is_left_alone(server):
    body = hires(hr_sampler_name="DDIM")
    plain = server.generate(body)
    mixed = server.generate(hrmix(body, alpha=1.0))
    assert forge.max_diff(mixed.image, plain.image) == 0
    assert "hrmix" not in mixed.infotext
    assert "does nothing with sampler 'DDIM'" in server.log_text()


def test_invalid_ranges_are_rejected_with_the_allowed_range(server):
    err = server.generate_error(hrmix(hires(), alpha=0))
    assert "hrmix.alpha=0" in err and "[0.05, 100]" in err
    err = server.generate_error(hrmix(hires(), stop=2.5))
    assert "hrmix.stop=2.5" in err and "[0, 2]" in err
    err = server.generate_error(hrmix(hires(), blend_min=0.8, blend_max=0.2))
    assert "hrmix.blend_min=0.8" in err and "blend_max" in err
    err = server.generate_error(hrmix(hires(), schedule="cosine"))
    assert "hrmix.schedule" in err and "demofusion_cosine" in err
    err = server.generate_error(hrmix(hires(), alfa=1))
    assert "hrmix.alfa" in err
