"""The Forge adapter against fakes of the documented API."""

from __future__ import annotations

import pytest

from lib_imgcond.core.errors import ImgcondError
from lib_imgcond.hosts import forge
from tests.glue.fakes import FakeUnetPatcher, fake_p


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd2", "flux"])
def test_model_family(family):
    assert forge.model_family(fake_p(family).sd_model) == family


def test_refiner_and_unknown():
    class StableDiffusionXLRefiner:
        is_sdxl = True

    class Odd:
        pass

    assert forge.model_family(StableDiffusionXLRefiner()) == "sdxl_refiner"
    assert forge.model_family(Odd()) == "other"


def test_require_family_message():
    p = fake_p("flux")
    with pytest.raises(ImgcondError, match=r"RefDrop needs a SD1\.5 or SDXL model, but the loaded checkpoint is Flux"):
        forge.require_family(p.sd_model, ("sd15", "sdxl"), "RefDrop")
    assert forge.require_family(fake_p("sdxl").sd_model, ("sd15", "sdxl"), "RefDrop") == "sdxl"


def test_patch_unet_clones_and_is_idempotent():
    p = fake_p()
    original = p.sd_model.forge_objects.unet

    def apply(unet):
        unet.add_conditioning_modifier(lambda *a: a)

    first = forge.patch_unet(p, apply)
    assert first is not original and p.sd_model.forge_objects.unet is first
    assert "conditioning_modifiers" not in original.model_options  # the original is never touched
    p.sd_model.forge_objects.unet = original  # Forge resets forge_objects before the next call
    second = forge.patch_unet(p, apply)
    assert len(second.model_options["conditioning_modifiers"]) == 1


def test_job_state_created_once_and_dropped():
    p = fake_p()
    made = []
    a = forge.job_state(p, "k", lambda: made.append(1) or {"x": 1})
    b = forge.job_state(p, "k", lambda: made.append(1) or {"x": 2})
    assert a is b and made == [1]
    forge.drop_job_state(p, "k")
    assert forge.job_state(p, "k", dict) == {}


def test_abort_generation_raises_from_sample():
    p = fake_p()
    err = ImgcondError("boom")
    forge.abort_generation(p, err)
    with pytest.raises(ImgcondError, match="boom"):
        p.sample(conditioning=None)


def test_refuse_sampling_adds_raising_modifier():
    unet = FakeUnetPatcher()
    forge.refuse_sampling(unet, ImgcondError("late"))
    with pytest.raises(ImgcondError, match="late"):
        unet.model_options["conditioning_modifiers"][0](None, None, None, None, None, None, None, None)


def test_existing_attn1_replace_skips_our_own():
    unet = FakeUnetPatcher()

    def theirs(q, k, v, extra):
        return q

    unet.set_model_attn1_replace(theirs, "output", 3, 0)
    assert forge.existing_attn1_replace(unet, ("output", 3, 0)) is theirs
    ours = forge.mark_ours(lambda q, k, v, e: v, inner=theirs)
    unet.set_model_attn1_replace(ours, "output", 3, 0)
    assert forge.existing_attn1_replace(unet, ("output", 3, 0)) is theirs
    unet.set_model_attn1_replace(forge.mark_ours(lambda *a: None), "middle", 0, 0)
    assert forge.existing_attn1_replace(unet, ("middle", 0, 0)) is None
    assert forge.existing_attn1_replace(unet, ("input", 1, 0)) is None


def test_pass_name():
    assert forge.pass_name(fake_p()) == "first"
    assert forge.pass_name(fake_p(is_hr_pass=True)) == "hires"
