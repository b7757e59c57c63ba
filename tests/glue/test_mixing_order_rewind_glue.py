"""Hires mixing's order and rewind options through the spec and the Forge glue (against the fakes of mixing_fakes)."""

from __future__ import annotations

import pytest
import torch

from lib_imgcond.core.errors import ArgumentError
from lib_imgcond.core.mixing import MixParams, noise_scaling, zprime_weights
from lib_imgcond.hosts import forge_mixing as host
from lib_imgcond.ui.mixing_spec import SPEC
from tests.glue.mixing_fakes import SIGMAS, fake_p, latents, run

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
