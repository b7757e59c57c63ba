"""Extension-wide settings on both kinds of server."""

from __future__ import annotations

from collections.abc import Callable


def on_settings(register: Callable[[], None]) -> None:
    """Run `register` (it adds options to `shared.opts`) where the server sees them. The WebUI calls its
    `on_ui_settings` callbacks while it builds the Settings page; an API-only server (`--nowebui`) builds no page and
    never calls them, so its `/sdapi/v1/options` would neither list nor accept our settings. There they are added by
    `on_before_ui`, which both hosts call before the API serves."""
    from modules import script_callbacks, shared

    if getattr(shared.cmd_opts, "nowebui", False):
        script_callbacks.on_before_ui(register)
    else:
        script_callbacks.on_ui_settings(register)
