"""Extension-wide settings on both kinds of server, and in `/sdapi/v1/options`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def on_settings(register: Callable[[], None]) -> None:
    """Run `register` (it adds options to `shared.opts`) where the server sees them. The WebUI calls its
    `on_ui_settings` callbacks while it builds the Settings page, before its API; an API-only server (`--nowebui`)
    never calls them, so there they are added now, while the scripts load (before the API is built)."""
    from modules import script_callbacks, shared

    def added_to_the_api() -> None:
        before = set(shared.opts.data_labels)
        register()
        _extend_options_model([k for k in shared.opts.data_labels if k not in before], shared.opts)

    if getattr(shared.cmd_opts, "nowebui", False):
        added_to_the_api()
    else:
        script_callbacks.on_ui_settings(added_to_the_api)


def _extend_options_model(keys: list[str], opts: Any) -> None:
    """Add `keys` to the response model of `GET /sdapi/v1/options`. The host builds that model once, from the
    options known when `modules.api.models` is first imported, and built-in extensions import it before any other
    extension loads: without this, the endpoint drops every extension's settings (POST sets them all the same).
    Only adds fields; the API, built after the scripts and the Settings page, takes the model as it is then."""
    models = sys.modules.get("modules.api.models")
    if models is None or not keys:
        return  # not built yet: it will be, from every registered option
    from pydantic import Field, create_model

    fields = {}
    for key in keys:
        info = opts.data_labels[key]
        kind = opts.typemap.get(type(info.default), type(info.default)) if info.default else Any
        fields[key] = (kind | None, Field(default=info.default, description=info.label))
    models.OptionsModel = create_model("Options", __base__=models.OptionsModel, **fields)
