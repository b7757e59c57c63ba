"""Extension settings reach both kinds of server: the WebUI's Settings page, and an API-only server's options."""

from __future__ import annotations

import sys
import types

import pytest

from lib_imgcond.webui.settings import on_settings


def _host(monkeypatch, nowebui: bool) -> tuple[dict[str, list], types.SimpleNamespace]:
    hooks: dict[str, list] = {"on_ui_settings": [], "on_before_ui": []}
    callbacks = types.ModuleType("modules.script_callbacks")
    for name, seen in hooks.items():
        setattr(callbacks, name, seen.append)
    shared = types.ModuleType("modules.shared")
    shared.cmd_opts = types.SimpleNamespace(nowebui=nowebui)
    shared.opts = types.SimpleNamespace(data_labels={"host_option": None}, typemap={})
    modules = types.ModuleType("modules")
    modules.script_callbacks, modules.shared = callbacks, shared
    for name, mod in {"modules": modules, "modules.script_callbacks": callbacks, "modules.shared": shared}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "modules.api.models", raising=False)  # its model is built later, from all
    return hooks, shared.opts


@pytest.mark.parametrize("nowebui", [False, True])
def test_settings_register_once_where_the_server_sees_them(monkeypatch, nowebui):
    """The WebUI: through on_ui_settings (it builds the Settings page, then the API). API-only: at once, while the
    scripts load, since it never calls on_ui_settings."""
    hooks, opts = _host(monkeypatch, nowebui)
    runs = []

    def register():
        runs.append(1)
        opts.data_labels["imgcond_x"] = types.SimpleNamespace(default=1.0, label="x")

    on_settings(register)
    if nowebui:
        assert runs == [1] and hooks == {"on_ui_settings": [], "on_before_ui": []}
    else:
        assert runs == [] and len(hooks["on_ui_settings"]) == 1 and not hooks["on_before_ui"]
        hooks["on_ui_settings"][0]()
        assert runs == [1]
    assert "imgcond_x" in opts.data_labels
