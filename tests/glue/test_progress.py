"""The progress helper against a stand-in for modules.shared.state."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from lib_imgcond.host import progress


def _state():
    return SimpleNamespace(textinfo=None, sampling_step=7, sampling_steps=20)


def test_status_text_and_bar_then_restored():
    state = _state()
    with progress.status("Redux: encoding 2 reference images", steps=2, state=state) as bar:
        assert (state.textinfo, state.sampling_step, state.sampling_steps) == (
            "Redux: encoding 2 reference images",
            0,
            2,
        )
        bar.step()
        assert state.sampling_step == 1
        bar.step(5)
        assert state.sampling_step == 2  # never past the end
    assert (state.textinfo, state.sampling_step, state.sampling_steps) == (None, 7, 20)


def test_text_only_keeps_the_samplers_bar_and_restores_on_error():
    state = _state()
    seen = []

    def save():
        with progress.status("RefDrop: saving 'cat'", state=state):
            seen.append((state.textinfo, state.sampling_step, state.sampling_steps))
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save()
    assert seen == [("RefDrop: saving 'cat'", 7, 20)] and state.textinfo is None


def test_uses_the_webui_state(monkeypatch):
    shared = types.ModuleType("modules.shared")
    shared.state = _state()
    modules = types.ModuleType("modules")
    modules.shared = shared
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    with progress.status("CLIP image guidance: loading the encoder"):
        assert shared.state.textinfo == "CLIP image guidance: loading the encoder"
    assert shared.state.textinfo is None


def test_outside_a_webui_it_does_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "modules", None)
    with progress.status("x", steps=3) as bar:
        bar.step()
    assert bar.done == 1
