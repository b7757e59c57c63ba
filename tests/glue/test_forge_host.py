"""The Forge adapter against fakes of the documented API."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lib_imgcond.common import log
from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host import forge
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


def _engine(name: str, **flags):
    """An engine object whose class has the host's class name, like Forge's diffusion engines."""
    return type(name, (), flags)()


@pytest.mark.parametrize(
    ("engine", "family"),
    [
        ("Flux2", "flux2"),  # Neo's Flux.2 Klein: same transformer class as Flux.1, not Flux.1
        ("Chroma", "chroma"),
        ("QwenImage", "qwen_image"),
        ("ZImage", "zimage"),
        ("Wan", "wan"),
        ("Lumina2", "lumina2"),
        ("StableDiffusion3", "sd3"),
    ],
)
def test_neo_families(engine, family):
    sd_model = _engine(engine)
    sd_model.forge_objects = SimpleNamespace(
        unet=SimpleNamespace(model=SimpleNamespace(diffusion_model=_engine("IntegratedFluxTransformer2DModel")))
    )
    assert forge.model_family(sd_model) == family
    assert family in forge.FAMILY_LABELS


def test_flags_do_not_override_a_known_engine():
    assert forge.model_family(_engine("Mugen", is_sdxl=True)) == "mugen"  # Neo's Mugen sets is_sdxl
    assert forge.model_family(_engine("SomethingNew", is_sdxl=True)) == "sdxl"


def test_flux2_is_refused_by_redux_with_its_name():
    with pytest.raises(ImgcondError, match=r"Redux needs a Flux model, but the loaded checkpoint is Flux\.2 \(Klein\)"):
        forge.require_family(_engine("Flux2"), ("flux",), "Redux")


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


def test_notify_reaches_the_ui_comments_and_the_api_info():
    processed = SimpleNamespace(comments="earlier\n", extra_generation_params={"Steps": 3})
    forge.notify(processed, "RefDrop: discarded")
    forge.notify(processed, "second")
    assert processed.comments == "earlier\nRefDrop: discarded\nsecond\n"
    assert processed.extra_generation_params[forge.NOTICE_KEY] == ["RefDrop: discarded", "second"]


@pytest.fixture
def fake_fastapi(monkeypatch):
    """fastapi's HTTPException as the WebUI's server sees it: status_code, detail, headers."""
    import sys
    import types

    class HTTPException(Exception):
        def __init__(self, status_code, detail=None, headers=None):
            super().__init__(status_code, detail)
            self.status_code, self.detail, self.headers = status_code, detail, headers

    module = types.ModuleType("fastapi")
    module.HTTPException = HTTPException
    monkeypatch.setitem(sys.modules, "fastapi", module)
    return module


def test_user_errors_reach_the_server_as_http_400_with_their_message(fake_fastapi):
    from lib_imgcond.common.errors import ArgumentError

    for err in (ImgcondError("RefDrop: no reference 'x'"), ArgumentError("refdrop.coefficient", 9, "a number")):
        raised = forge.user_error(err)
        assert isinstance(raised, type(err)) and isinstance(raised, fake_fastapi.HTTPException)
        assert type(raised).__name__ == type(err).__name__  # the UI shows "ImgcondError: <message>" as before
        assert (raised.status_code, raised.detail, str(raised)) == (400, str(err), str(err))
    p = fake_p()
    forge.abort_generation(p, ImgcondError("boom"))
    with pytest.raises(fake_fastapi.HTTPException) as info:
        p.sample(conditioning=None)
    assert info.value.status_code == 400 and str(info.value) == "boom"


def test_user_error_without_a_web_server_is_the_error_itself(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fails
    err = ImgcondError("x")
    assert forge.user_error(err) is err


def test_http_route_answers_400_and_logs_one_line(fake_fastapi):
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log.logger.addHandler(handler)

    @forge.http_route
    def delete_reference(name: str):
        raise ImgcondError(f"bad name {name!r}")

    try:
        with pytest.raises(fake_fastapi.HTTPException) as info:
            delete_reference("a/b")
    finally:
        log.logger.removeHandler(handler)
    assert info.value.status_code == 400 and info.value.detail == "bad name 'a/b'"
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert [r.getMessage() for r in records] == ["bad name 'a/b'"] and records[0].exc_info is None
    import inspect

    assert list(inspect.signature(delete_reference).parameters) == ["name"]  # FastAPI reads the path parameter


def test_warn_shows_with_the_image_once():
    p = fake_p()
    p.comments = {}
    p.comment = lambda text: p.comments.__setitem__(text, 1)
    forge.warn(p, "mixing did nothing")
    forge.warn(p, "mixing did nothing")  # the second hires hook call
    forge.warn(p, "other")
    assert list(p.comments) == ["mixing did nothing", "other"]
    assert p.extra_generation_params[forge.NOTICE_KEY] == "mixing did nothing | other"
