"""HTTP routes of the extension: /imgcond/v1/version and /imgcond/v1/techniques (argument schemas)."""

from __future__ import annotations

from modules import script_callbacks

from lib_imgcond import __version__
from lib_imgcond.spec import registry


def add_routes(_demo, app):
    @app.get("/imgcond/v1/version")
    def version():
        return {"version": __version__}

    @app.get("/imgcond/v1/techniques")
    def techniques():
        return registry.describe()


script_callbacks.on_app_started(add_routes)
