"""TechniqueScript.start_job: process() of the techniques that plan once per job (Style model, unCLIP)."""

from __future__ import annotations

import importlib
import sys
import types
from types import SimpleNamespace

import pytest

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host import capabilities as host
from lib_imgcond.host import progress
from lib_imgcond.unclip.spec import SPEC


@pytest.fixture
def Script(monkeypatch):
    """TechniqueScript, imported against a stand-in gradio (the panels need none here)."""
    if "gradio" not in sys.modules:
        gradio = types.ModuleType("gradio")
        gradio.__version__ = "4.40.0"
        monkeypatch.setitem(sys.modules, "gradio", gradio)
        for name in ("lib_imgcond.webui.panel", "lib_imgcond.webui.script"):
            monkeypatch.delitem(sys.modules, name, raising=False)
    script = importlib.import_module("lib_imgcond.webui.script")
    return type("Script", (script.TechniqueScript,), {"spec": SPEC})


@pytest.fixture
def state(monkeypatch):
    monkeypatch.setattr(host, "require_forge", lambda p, title: None)
    shown = SimpleNamespace(textinfo=None, sampling_step=0, sampling_steps=0)
    monkeypatch.setattr(progress, "_state", lambda: shown)
    return shown


def fake_p():
    return SimpleNamespace(extra_generation_params={})


def test_plans_with_status_and_keeps_the_job(Script, state):
    p, seen = fake_p(), []

    def plan(values):
        seen.append((values["enabled"], state.textinfo))
        return "job"

    assert Script().start_job(p, [{"strength1": 0.5}], "unclip", plan, "unCLIP: encoding") == "job"
    assert seen == [(True, "unCLIP: encoding")]
    assert state.textinfo is None  # put back afterwards
    assert p._imgcond_state["unclip"] == "job"


def test_off_plans_nothing_and_drops_an_old_job(Script, state):
    p = fake_p()
    p._imgcond_state = {"unclip": "stale"}
    assert Script().start_job(p, [False], "unclip", lambda values: pytest.fail("planned while off")) is None
    assert "unclip" not in p._imgcond_state


def test_a_user_error_stops_the_generation_with_its_message(Script, state):
    p = fake_p()

    def plan(values):
        raise ImgcondError("unCLIP needs an SD2.1 unCLIP checkpoint")

    assert Script().start_job(p, [{}], "unclip", plan, "unCLIP: encoding") is None
    assert "unclip" not in getattr(p, "_imgcond_state", {})
    with pytest.raises(Exception, match=r"SD2\.1 unCLIP"):
        p.sample()
