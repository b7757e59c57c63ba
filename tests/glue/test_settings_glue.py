"""Extension settings reach both kinds of server: the WebUI's Settings page, and an API-only server's options."""

from __future__ import annotations

import sys
import types

import pytest

from lib_imgcond.webui.settings import on_settings


@pytest.mark.parametrize(("nowebui", "hook"), [(False, "on_ui_settings"), (True, "on_before_ui")])
def test_settings_register_where_the_server_calls_them(monkeypatch, nowebui, hook):
    called: dict[str, list] = {"on_ui_settings": [], "on_before_ui": []}
    callbacks = types.ModuleType("modules.script_callbacks")
    for name, seen in called.items():
        setattr(callbacks, name, seen.append)
    shared = types.ModuleType("modules.shared")
    shared.cmd_opts = types.SimpleNamespace(nowebui=nowebui)
    modules = types.ModuleType("modules")
    modules.script_callbacks, modules.shared = callbacks, shared
    for name, mod in {"modules": modules, "modules.script_callbacks": callbacks, "modules.shared": shared}.items():
        monkeypatch.setitem(sys.modules, name, mod)

    def register():
        pass

    on_settings(register)
    assert called[hook] == [register]
    assert sum(map(len, called.values())) == 1  # once: never twice on the same server
