"""Fixtures for the browser tier: a real Forge serving its UI on loopback, driven by Debian's headless chromium.

Opt-in like tests/e2e (the same IMGCOND_FORGE_DIR / IMGCOND_FORGE_PYTHON variables); skipped when they are unset or
when chromium, chromedriver or selenium is missing.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from tests.e2e import forge, webui

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _missing() -> str | None:
    try:
        if forge.forge_paths() is None:
            return forge.SKIP_REASON
    except RuntimeError as e:
        raise pytest.UsageError(str(e)) from None
    if not CHROMIUM or not DRIVER:
        return "the browser tier needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)"
    if importlib.util.find_spec("selenium") is None:
        return "the browser tier needs selenium (pip install selenium)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _missing()
    for item in items:
        if "tests/ui/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.ui)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def pytest_sessionfinish(session, exitstatus):
    webui.stop_all()


@pytest.fixture(scope="session")
def shots() -> Path:
    """Where every panel's screenshot goes (not in the repository): <e2e cache>/ui-screenshots/<host>."""
    folder = forge.cache_dir() / "ui-screenshots" / forge.host_kind()
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {folder}")
    return folder


@pytest.fixture(scope="session")
def ui_server():
    from tests.e2e.test_flexdiffuse import ENCODER_L, write_encoder

    srv = webui.ForgeServer(forge.checkpoint("sd15"), with_extension=True, ui=True)
    write_encoder(srv.data_dir / "models" / "imgcond" / "clip_vision", ENCODER_L, 768, seed=1)
    srv.start(timeout=420)
    yield srv
    try:
        leaked = srv.extension_tracebacks()
        assert not leaked, "tracebacks mentioning the extension in the server log:\n" + "\n".join(leaked)
        nans = srv.nan_lines()
        assert not nans, "the server logged NaN:\n" + "\n".join(nans[:10])
    finally:
        srv.cleanup()


@pytest.fixture(scope="session")
def browser(ui_server):
    from tests.ui.browser import Browser

    b = Browser(ui_server.url, CHROMIUM, DRIVER)
    yield b
    b.quit()
