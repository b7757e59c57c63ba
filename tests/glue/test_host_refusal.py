"""The host probe, and the refusal on a WebUI without Forge's patcher (an AUTOMATIC1111-like host).

The real scripts/ files are imported against small stand-ins of `modules.*` and `gradio` (no WebUI here), then run
as the WebUI runs them: `process` with a technique enabled. On a host without `forge_objects` the job must stop
with the clear message and no infotext key may be written.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from types import SimpleNamespace

import pytest

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host import capabilities as host
from lib_imgcond.spec import registry
from tests.glue.fakes import fake_p

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def _fake_backend(monkeypatch, forward_orig) -> None:
    model = type("IntegratedFluxTransformer2DModel", (), {"forward_orig": forward_orig})
    flux = _module("backend.nn.flux", IntegratedFluxTransformer2DModel=model)
    mods = {
        "backend": _module("backend"),
        "backend.nn": _module("backend.nn", flux=flux),
        "backend.nn.flux": flux,
        "backend.patcher": _module("backend.patcher"),
        "backend.patcher.unet": _module("backend.patcher.unet", UnetPatcher=object),
    }
    for mod in mods.values():
        mod.__spec__ = importlib.util.spec_from_loader(mod.__name__, loader=None)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)


def test_probe_without_forge(monkeypatch):
    for name in ("backend", "backend.patcher", "backend.patcher.unet"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    caps = host.probe()
    assert caps == host.Capabilities(patcher=False, flux_block_replace=False)
    assert caps.name == "a WebUI without Forge's model patcher"


def test_probe_forge2(monkeypatch):
    _fake_backend(monkeypatch, lambda self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None: img)
    caps = host.probe()
    assert caps.patcher and not caps.flux_block_replace and caps.name == "Forge"


def test_probe_neo(monkeypatch):
    _fake_backend(monkeypatch, lambda self, img, img_ids, txt, txt_ids, timesteps, y, transformer_options={}: img)
    caps = host.probe()
    assert caps.patcher and caps.flux_block_replace and caps.name == "Forge Neo"


def test_require_forge_and_notice(monkeypatch):
    monkeypatch.setattr(host, "capabilities", lambda: host.Capabilities(patcher=True))
    host.require_forge(fake_p(), "RefDrop")  # Forge and a Forge model: fine
    assert host.notice("RefDrop") is None
    with pytest.raises(ImgcondError, match="RefDrop needs Stable Diffusion WebUI Forge or Forge Neo"):
        host.require_forge(SimpleNamespace(sd_model=SimpleNamespace()), "RefDrop")  # no forge_objects
    monkeypatch.setattr(host, "capabilities", lambda: host.Capabilities(patcher=False))
    with pytest.raises(ImgcondError, match="Turn RefDrop off, or run it in Forge / Forge Neo"):
        host.require_forge(fake_p(), "RefDrop")
    assert host.notice("Redux control").startswith("⚠️ Redux control needs Stable Diffusion WebUI Forge or Forge Neo")


# --- the real scripts on an A1111-like WebUI --------------------------------------------------------------------------
class _Script:
    pass


@pytest.fixture
def webui(monkeypatch):
    """The stand-ins, and afterwards no module imported against them stays behind."""
    before = set(sys.modules)
    _webui_stand_ins(monkeypatch)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("lib_imgcond", "_imgcond_test_")):
            del sys.modules[name]


def _webui_stand_ins(monkeypatch) -> None:
    noop = lambda *a, **k: None  # noqa: E731
    shared = _module("modules.shared", opts=SimpleNamespace(), OptionInfo=noop, cmd_opts=SimpleNamespace(nowebui=False))
    mods = {
        "gradio": _module("gradio", __version__="3.41.2", update=noop, Markdown=noop, Number=object),
        "modules": _module("modules"),
        "modules.scripts": _module("modules.scripts", Script=_Script, AlwaysVisible=object(), scripts_data=[]),
        "modules.script_callbacks": _module(
            "modules.script_callbacks", on_ui_settings=noop, on_before_ui=noop, on_app_started=noop
        ),
        "modules.shared": shared,
        "modules.ui_components": _module("modules.ui_components", InputAccordion=object, ToolButton=object),
    }
    mods["modules"].__dict__.update(scripts=mods["modules.scripts"], shared=shared)
    mods["modules"].script_callbacks = mods["modules.script_callbacks"]
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    for name in ("backend", "backend.patcher", "backend.patcher.unet"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(host, "capabilities", host.probe)  # probe the stand-in WebUI, not a cached answer
    monkeypatch.setattr(registry, "register", noop)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_imgcond_test_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CASES = [
    ("imgcond_refdrop", "RefDropScript", {"mode": "Record", "reference": "hero"}, "RefDrop"),
    ("imgcond_redux", "ReduxScript", {}, "Redux control"),
    ("imgcond_hires_mixing", "HiresMixingScript", {}, "Hires iterative mixing"),
    ("imgcond_clip_guidance", "ClipGuidanceScript", {}, "CLIP image guidance"),
    ("imgcond_style_model", "StyleModelScript", {}, "Style model"),
    ("imgcond_unclip", "UnclipScript", {}, "unCLIP"),
]


@pytest.mark.parametrize(("module", "cls", "named", "title"), CASES)
def test_enabled_technique_stops_with_the_message_on_a1111(webui, module, cls, named, title):
    script = getattr(_load(module), cls)()
    assert script.title() == title
    p = SimpleNamespace(sd_model=SimpleNamespace(), extra_generation_params={}, enable_hr=True, steps=3)
    script.process(p, {"enabled": True, **named})
    with pytest.raises(ImgcondError, match=f"{title} needs Stable Diffusion WebUI Forge or Forge Neo"):
        p.sample()
    assert p.extra_generation_params == {}  # no infotext key claims an effect
    assert not getattr(p, "_imgcond_state", {})


@pytest.mark.parametrize(("module", "cls", "named", "title"), CASES)
def test_disabled_technique_is_silent_on_a1111(webui, module, cls, named, title):
    script = getattr(_load(module), cls)()
    p = SimpleNamespace(sd_model=SimpleNamespace(), extra_generation_params={}, enable_hr=True, steps=3)
    script.process(p, {"enabled": False, **named})
    assert "sample" not in p.__dict__ and p.extra_generation_params == {}
