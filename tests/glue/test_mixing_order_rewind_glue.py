"""Hires mixing's order and rewind options through the spec and the Forge glue (against the fakes of mixing_fakes)."""

from __future__ import annotations

import pytest
import torch

from lib_imgcond.common.errors import ArgumentError
from lib_imgcond.mixing import forge_mixing as host
from lib_imgcond.mixing.blends import noise_scaling
from lib_imgcond.mixing.mixer import rewind_seed
from lib_imgcond.mixing.schedules import MixParams, zprime_weights
from lib_imgcond.mixing.spec import SPEC
from tests.glue.mixing_fakes import SHAPE, SIGMAS, fake_p, latents, run, sample_heun

OLD_POSITIONAL = [True, "linear", 2.0, 0.1, 1.2, 0.9, 0.1, 0.7, "slerp", True, True]  # before order / rewind existed


# --- spec: new parameters appended, old forms still valid -------------------------------------------------------------
def test_order_is_appended_and_old_positional_args_keep_their_meaning():
    names = [p.name for p in SPEC.params]
    assert names.index("order") > names.index("fresh_noise")
    old = SPEC.parse(OLD_POSITIONAL)
    assert old["order"] == "demofusion"
    assert SPEC.parse([*OLD_POSITIONAL, "iterative_mixer"])["order"] == "iterative_mixer"
    assert host.mix_params(SPEC.parse([{"order": "iterative_mixer"}])).order == "iterative_mixer"


def test_order_infotext_round_trip_and_old_infotext_pastes():
    values = SPEC.parse([{"order": "iterative_mixer"}])
    text = {k: str(v) for k, v in SPEC.infotext(values).items()}
    assert text["hrmix_order"] == "iterative_mixer"
    assert SPEC.paste(text)["order"] == "iterative_mixer"
    old_text = {k: v for k, v in text.items() if k != "hrmix_order"}
    assert "order" not in SPEC.paste(old_text)  # an old infotext leaves the component at its value


def test_order_rejects_unknown_values_naming_the_argument():
    with pytest.raises(ArgumentError) as info:
        SPEC.parse([{"order": "after"}])
    assert "hrmix.order='after'" in str(info.value) and "'demofusion', 'iterative_mixer'" in str(info.value)


# --- glue: iterative_mixer order -------------------------------------------------------------------------------------
def test_iterative_mixer_order_blends_after_each_update_including_the_last():
    z, e = latents()
    params = MixParams(schedule="linear", blend_max=0.9, order="iterative_mixer")
    p = fake_p()
    out, mixers = run(p, z, e, params)
    assert mixers[0].mixed_steps == [0, 1, 2, 3, 4]
    # the original's loop, by hand, with the fake denoiser D(x) = x/2
    w = zprime_weights(params, 5)
    sig = [float(s) for s in SIGMAS]
    x = noise_scaling(sig[0], e, z)
    seen = p.sampler.model_wrap_cfg.calls
    for i in range(5):
        assert torch.allclose(seen[i][1], x, atol=1e-5)  # the model sees the state after the previous blend
        x = x + (x - 0.5 * x) / sig[i] * (sig[i + 1] - sig[i])
        zp = noise_scaling(sig[i], e, z)  # z'_i at σ_i although x is at σ_{i+1}
        x = (1 - w[i]) * x + w[i] * zp
    assert torch.allclose(out, x, atol=1e-5)
    default, _ = run(fake_p(), z, e, MixParams(schedule="linear", blend_max=0.9))
    assert not torch.allclose(out, default, atol=1e-3)


# --- rewind -------------------------------------------------------------------------------------------------------
def test_rewind_params_are_appended_and_round_trip_through_infotext():
    names = [p.name for p in SPEC.params]
    assert names[-4:] == ["order", "rewind", "rewind_min", "rewind_max"]
    old = SPEC.parse(OLD_POSITIONAL)
    assert (old["rewind"], old["rewind_min"], old["rewind_max"]) == (False, 0.5, 0.8)
    values = SPEC.parse([*OLD_POSITIONAL, "demofusion", True, 0.4, 0.9])
    params = host.mix_params(values)
    assert (params.rewind, params.rewind_min, params.rewind_max) == (True, 0.4, 0.9)
    text = {k: str(v) for k, v in SPEC.infotext(values).items()}
    assert (text["hrmix_rewind"], text["hrmix_rewind_min"], text["hrmix_rewind_max"]) == ("True", "0.4", "0.9")
    assert SPEC.paste(text) == {k: v for k, v in values.items() if k != "enabled"}


def test_rewind_min_must_be_below_max_and_the_error_names_it():
    with pytest.raises(ArgumentError, match=r"hrmix\.rewind_min=0\.9 .*rewind_max \(0\.8\)"):
        host.mix_params(SPEC.parse([{"rewind": True, "rewind_min": 0.9}]))
    assert host.mix_params(SPEC.parse([{"rewind": False, "rewind_min": 0.9}])).rewind_min == 0.9
    with pytest.raises(ArgumentError, match=r"hrmix\.rewind_max=1\.5"):
        SPEC.parse([{"rewind_max": 1.5}])


def test_rewind_resamples_from_later_steps_with_offset_progress_and_prompt_steps():
    z, e = latents()
    params = MixParams(schedule="linear", rewind=True)
    p = fake_p(seeds=[7])
    progress: list[int] = []
    out, mixers = run(p, z, e, params, callback=lambda d: progress.append(d["i"]))
    # 5 steps: ranges (0, 5), (2, 5), (3, 5), (4, 5)
    assert [m.n_steps for m in mixers] == [5, 3, 2, 1]
    assert [m.generator_seed for m in mixers] == [7, *(rewind_seed(7, r) for r in (1, 2, 3))]
    assert progress == [0, 1, 2, 3, 4, 2, 3, 4, 3, 4, 4]
    assert p.sampler.model_wrap_cfg.steps_seen == progress  # prompt editing sees the steps it would without rewind
    # by hand (demofusion order, fake denoiser D(x) = x/2)
    sig = [float(s) for s in SIGMAS]
    w = zprime_weights(params, 5)
    ref, eps, x = z, e, noise_scaling(sig[0], e, z)
    for r, start in enumerate((0, 2, 3, 4)):
        if r:
            g = torch.Generator().manual_seed(rewind_seed(7, r))
            ref, eps = x, torch.randn(SHAPE, generator=g)
            x = ref + sig[start] * eps
        for j in range(start, 5):
            x = (1 - w[j]) * x + w[j] * (ref + sig[j] * eps)
            x = x + (x - 0.5 * x) / sig[j] * (sig[j + 1] - sig[j])
    assert torch.allclose(out, x, atol=1e-5)


def test_rewind_with_heun_restarts_the_call_counter_at_the_rounds_step():
    z, e = latents()
    p = fake_p(sample_heun)
    _, mixers = run(p, z, e, MixParams(rewind=True))
    assert [m.handled_steps for m in mixers] == [[0, 1, 2, 3, 4], [0, 1, 2], [0, 1], [0]]
    seen = p.sampler.model_wrap_cfg.steps_seen
    assert seen[:9] == list(range(9))  # 4 Heun steps of 2 calls + 1 final Euler step
    assert seen[9] == 4  # the round from step 2 starts where step 2's calls started (2 calls per step)
