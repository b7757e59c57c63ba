"""Hires iterative mixing's Forge adapter (mixing/forge_mixing.py) and spec against small fakes of Forge's sampler."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.common.log import logger
from lib_imgcond.mixing import forge_mixing as host
from lib_imgcond.mixing.blends import noise_scaling
from lib_imgcond.mixing.mixer import HiresMixer
from lib_imgcond.mixing.schedules import MixParams, zprime_weights
from lib_imgcond.mixing.spec import SPEC
from tests.glue.mixing_fakes import (
    SIGMAS,
    FakeDenoiser,
    ddim,
    fake_p,
    latents,
    run,
    sample_dpm_fast,
    sample_euler,
    sample_euler_ancestral_flux_check,
    sample_heun,
    sample_heunpp2,
)


# --- spec ------------------------------------------------------------------------------------------------------------
def test_spec_defaults_match_core_defaults():
    values = SPEC.parse([{}])
    assert values["enabled"] is True
    assert host.mix_params(values) == MixParams()
    assert [p.name for p in SPEC.params if p.xyz] == ["schedule", "alpha", "blend_max", "order"]
    assert SPEC.prefix == "hrmix" and SPEC.title.lower() == "hires iterative mixing"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"alpha": 0}, "hrmix.alpha=0 is not allowed: expected a number in [0.05, 100]"),
        ({"stop": 2.5}, "hrmix.stop=2.5 is not allowed: expected a number in [0, 2]"),
        ({"clamp": -0.1}, "hrmix.clamp=-0.1 is not allowed: expected a number in [0, 1]"),
        ({"blend_max": 1.5}, "hrmix.blend_max=1.5"),
        ({"schedule": "cosine"}, "one of 'demofusion_cosine', 'im_cosine', 'linear', 'logistic'"),
        ({"blend": "mul"}, "one of 'addition', 'slerp', 'norm_only'"),
        ({"alfa": 2}, "hrmix.alfa"),
    ],
)
def test_invalid_arguments_name_the_range(args, needle):
    with pytest.raises(ArgumentError) as e:
        SPEC.parse([args])
    assert needle in str(e.value)


def test_blend_min_above_blend_max_is_rejected():
    with pytest.raises(ArgumentError, match=r"hrmix\.blend_min=0\.8 .*blend_max"):
        host.mix_params(SPEC.parse([{"blend_min": 0.8, "blend_max": 0.2}]))


def test_positional_and_infotext_round_trip():
    positional = SPEC.parse([True, "linear", 2.0, 0.1, 1.2, 0.9, 0.1, 0.7, "slerp", True, True])
    named = SPEC.parse(
        [
            {
                "schedule": "linear",
                "alpha": 2,
                "start": 0.1,
                "stop": 1.2,
                "clamp": 0.9,
                "blend_min": 0.1,
                "blend_max": 0.7,
                "blend": "slerp",
                "normalize": True,
                "fresh_noise": True,
            }
        ]
    )
    assert positional == named
    text = {k: str(v) for k, v in SPEC.infotext(named).items()}  # what Forge's parser gives back: strings
    assert text["hrmix_enabled"] == "True" and text["hrmix_alpha"] == "2.0"
    assert SPEC.paste(text) == {k: v for k, v in named.items() if k != "enabled"}


def test_xyz_override_wins():
    values = SPEC.parse([True, "linear", 2.0], {"alpha": "4.5", "schedule": "im_cosine"})
    assert values["alpha"] == 4.5 and values["schedule"] == "im_cosine"


# --- flow detection and sampler support ------------------------------------------------------------------------------
def test_flow_detection():
    assert not host.is_flow(fake_p().sd_model)
    assert host.is_flow(fake_p(prediction_type="const").sd_model)

    class Flux:
        forge_objects = None

    assert host.is_flow(Flux())


@pytest.mark.parametrize(
    ("func", "supported"),
    [
        (sample_euler, True),
        (sample_heun, True),
        (ddim, False),
        (sample_dpm_fast, False),
        (sample_heunpp2, False),
    ],
)
def test_supported_samplers(func, supported):
    p = fake_p(func)
    z, e = latents()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)  # our logger does not propagate, so caplog cannot see it
    try:
        installed = host.install(p, MixParams(), z, e)
        host.install(p, MixParams(), z, e)  # the second hires hook call
    finally:
        logger.removeHandler(handler)
    assert installed is supported
    if supported:
        assert p.sampler.func is not func and p.sampler.func._imgcond_hrmix_orig is func
    else:
        assert p.sampler.func is func
        assert len([r for r in records if "does nothing with sampler" in r.getMessage()]) == 1
        shown = [c for c in p.comments if "does nothing with sampler" in c]  # under the image
        assert len(shown) == 1 and p.extra_generation_params["ImgCond notices"] == shown[0]  # and in info


# --- the mixing itself -----------------------------------------------------------------------------------------------
def test_wrapper_keeps_the_signature_forge_inspects():
    p = fake_p()
    host.install(p, MixParams(), *latents())
    params = inspect.signature(p.sampler.func).parameters
    assert "sigmas" in params and "sigma_min" not in params


def test_blend_max_zero_is_bitwise_plain():
    z, e = latents()
    plain = fake_p().sampler.sample_img2img(z, e, SIGMAS, 4)
    out, mixers = run(fake_p(), z, e, MixParams(blend_max=0.0))
    assert torch.equal(out, plain)
    assert mixers[0].mixed_steps == [] and mixers[0].handled_steps == [0, 1, 2, 3, 4]


def test_mixing_changes_the_sampler_state_not_only_the_model_input():
    z, e = latents()
    params = MixParams(schedule="linear")
    p = fake_p()
    out, mixers = run(p, z, e, params)
    mixer = mixers[0]
    assert mixer.n_steps == 5 and mixer.mixed_steps == [0, 1, 2, 3, 4]
    # replay Euler by hand, mixing the state itself before every step
    x = noise_scaling(SIGMAS[0], e, z)
    w = zprime_weights(params, 5)
    seen = p.sampler.model_wrap_cfg.calls
    for i in range(5):
        zp = noise_scaling(float(SIGMAS[i]), e, z)
        x = (1 - w[i]) * x + w[i] * zp
        assert torch.allclose(seen[i][1], x, atol=1e-5)  # the model saw the mixed state
        d = (x - 0.5 * x) / SIGMAS[i]
        x = x + d * (SIGMAS[i + 1] - SIGMAS[i])  # and the update started from it
    assert torch.allclose(out, x, atol=1e-5)
    plain = fake_p().sampler.sample_img2img(z, e, SIGMAS, 4)
    assert not torch.allclose(out, plain)


def test_img2img_partial_schedule_is_the_used_part():
    z, e = latents()
    _, mixers = run(fake_p(), z, e, MixParams(), t_enc=2)
    assert mixers[0].sigmas == pytest.approx([3.1, 1.2, 0.4, 0.0])
    assert mixers[0].n_steps == 3


def test_idempotent_across_the_two_hires_hook_calls():
    z, e = latents()
    p = fake_p()
    host.install(p, MixParams(), z, e)
    first = p.sampler.func
    host.install(p, MixParams(), z, e)
    assert p.sampler.func._imgcond_hrmix_orig is sample_euler
    assert first._imgcond_hrmix_orig is sample_euler
    mixers: list[HiresMixer] = []
    host.install(p, MixParams(), z, e, on_mixer=mixers.append)
    p.sampler.sample_img2img(z, e, SIGMAS, 4)
    assert len(mixers) == 1  # one wrapper, not a stack
    calls = p.sampler.model_wrap_cfg.calls
    assert len(calls) == 5  # one model evaluation per Euler step


def test_heun_mixes_the_real_state_once_per_step():
    z, e = latents()
    p = fake_p(sample_heun)
    _, mixers = run(p, z, e, MixParams(schedule="linear"))
    mixer = mixers[0]
    assert mixer.substep_repeats_sigma is True
    assert mixer.handled_steps == [0, 1, 2, 3, 4]
    calls = p.sampler.model_wrap_cfg.calls
    assert len(calls) == 9  # 4 Heun steps with a sub-step + 1 final Euler step


def test_flow_model_uses_flow_noise_scaling():
    z, e = latents()
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    p = fake_p(sample_euler_ancestral_flux_check, prediction_type="const")
    mixers: list[HiresMixer] = []
    host.install(p, MixParams(schedule="linear"), z, e, on_mixer=mixers.append)
    p.sampler.func(p.sampler.model_wrap_cfg, noise_scaling(0.75, e, z, True), sigmas=sigmas[1:])
    assert mixers[0].flow is True
    assert torch.allclose(mixers[0].zprime(0), 0.75 * e + 0.25 * z)


def test_fresh_noise_uses_the_job_seed():
    z, e = latents()
    _, a = run(fake_p(seeds=[7]), z, e, MixParams(fresh_noise=True))
    _, b = run(fake_p(seeds=[8]), z, e, MixParams(fresh_noise=True))
    assert a[0].generator_seed == 7 and b[0].generator_seed == 8
    assert not torch.equal(a[0].zprime(1), b[0].zprime(1))


def test_proxy_delegates_attributes_both_ways():
    inner = FakeDenoiser()
    proxy = host.MixingModel(inner, HiresMixer(MixParams(), [1.0, 0.0], *latents()))
    assert proxy.inner_model is inner.inner_model
    proxy.cond_scale_miltiplier = 0.08
    assert inner.cond_scale_miltiplier == 0.08


def test_inputs_are_copied_and_nothing_global_changes():
    z, e = latents()
    z0, e0 = z.clone(), e.clone()
    p = fake_p()
    run(p, z, e, MixParams())
    assert torch.equal(z, z0) and torch.equal(e, e0)
    assert fake_p().sampler.func is sample_euler  # a new sampler is untouched


def test_modified_noise_wins():
    n1, n2 = latents()
    assert host.pass_noise(fake_p(), {"noise": n1}) is n1
    assert host.pass_noise(fake_p(modified_noise=n2), {"noise": n1}) is n2


def test_one_latent_for_a_batch_is_broadcast_like_the_hosts_noise_scaling():
    # Neo's Qwen-Image re-encodes only the first image of a batch: z_up has batch 1, the pass's noise batch 2
    z, e = latents()
    noise = torch.cat([e, -e])
    out, mixers = run(fake_p(), z, noise, MixParams(schedule="linear"))
    assert out.shape[0] == 2 and mixers[0].mixed_steps
    assert torch.equal(mixers[0].zprime(1)[0], noise_scaling(float(mixers[0].sigmas[1]), e, z)[0])
    assert torch.equal(mixers[0].zprime(1)[1], noise_scaling(float(mixers[0].sigmas[1]), -e, z)[0])


def test_missing_latent_is_a_clear_error():
    with pytest.raises(ImgcondError, match="no latent or noise"):
        host.install(fake_p(), MixParams(), None, None)


def test_hires_fix_button_path_needs_no_first_pass():
    # txt2img_upscale: only the hires pass runs (the first-pass hook never fires); install works from that state
    z, e = latents()
    p = fake_p(txt2img_upscale=True, firstpass_image=object())
    _, mixers = run(p, z, e, MixParams(alpha=1.0))
    assert mixers[0].mixed_steps


def test_every_family_but_pid_is_served_and_pid_is_refused_with_the_reason():
    from types import SimpleNamespace

    for engine in ("StableDiffusionXL", "Flux", "Flux2", "QwenImage", "Wan", "ErnieImage", "StableDiffusionXLRefiner"):
        host.check_model(SimpleNamespace(sd_model=type(engine, (), {})()))
    pid = r"Hires iterative mixing needs .* checkpoint is PiD: Forge Neo runs PiD in img2img only"
    with pytest.raises(ImgcondError, match=pid):
        host.check_model(SimpleNamespace(sd_model=type("PiD", (), {})()))
    with pytest.raises(ImgcondError, match=r"checkpoint is an unknown architecture: its diffusion engine is none that"):
        host.check_model(SimpleNamespace(sd_model=object()))


def test_flow_is_read_from_the_predictor_before_the_family():
    from types import SimpleNamespace

    def engine(name, prediction_type):
        predictor = SimpleNamespace(prediction_type=prediction_type)
        unet = SimpleNamespace(model=SimpleNamespace(predictor=predictor))
        return type(name, (), {"forge_objects": SimpleNamespace(unet=unet)})()

    assert host.is_flow(engine("StableDiffusionXL", "const"))  # an SDXL checkpoint with a rectified-flow predictor
    assert not host.is_flow(engine("StableDiffusionXL", "epsilon"))
    assert host.is_flow(engine("ErnieImage", "const"))
    assert host.is_flow(type("Wan", (), {})())  # no predictor to read: the family says flow
    assert not host.is_flow(type("StableDiffusion2", (), {})())
