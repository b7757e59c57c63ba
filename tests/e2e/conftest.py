"""Fixtures for the end-to-end suite: real headless Forge servers, skipped when no Forge is configured."""

from __future__ import annotations

import os

import pytest

from tests.e2e import forge, guard, webui


def pytest_collection_modifyitems(config, items):
    try:
        configured = forge.forge_paths() is not None
    except RuntimeError as e:
        raise pytest.UsageError(str(e)) from None
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)
            if not configured:
                item.add_marker(pytest.mark.skip(reason=forge.SKIP_REASON))
    # The SDXL server (~19 GB) fits beside no other server on a 24 GiB machine: its tests run last, and each stops
    # whatever server is still up (the session's SD1.5 one) before starting, so one run can hold both
    items.sort(key=lambda item: item.get_closest_marker("sdxl") is not None)


def pytest_sessionfinish(session, exitstatus):
    webui.stop_all()  # whatever a failing fixture left behind


def pytest_terminal_summary(terminalreporter):
    if forge.forge_paths() is not None:
        terminalreporter.write_line(guard.summary())


@pytest.fixture(autouse=True)
def _no_nan_in_server_logs():
    """Fail a test during which a running server logged NaN (a degenerate generation proves nothing)."""
    marks = {srv: srv.log_size() for srv in list(webui._LIVE)}
    yield
    found = [line for srv in list(webui._LIVE) for line in srv.nan_lines(marks.get(srv, 0))]
    assert not found, "the server logged NaN during this test:\n" + "\n".join(found[:10])


def _serve(srv: webui.ForgeServer):
    """Start `srv`, hand it to the tests, then fail if the extension logged an unexpected traceback; always stop it."""
    srv.start()
    yield srv
    try:
        leaked = srv.extension_tracebacks()
        assert not leaked, "tracebacks mentioning the extension in the server log:\n" + "\n".join(leaked)
        nans = srv.nan_lines()
        assert not nans, "the server logged NaN:\n" + "\n".join(nans[:10])
    finally:
        srv.cleanup()


@pytest.fixture(scope="session")
def sd15_ckpt():
    return forge.checkpoint("sd15")


@pytest.fixture(scope="session")
def server(sd15_ckpt):
    """Forge with this extension, SD1.5 random checkpoint. Fails the session if the extension logged a traceback."""
    yield from _serve(webui.ForgeServer(sd15_ckpt, with_extension=True))


@pytest.fixture(scope="module")
def sdxl_server(request):
    """Forge with this extension and the SDXL checkpoint (about 19 GB of RAM: only with IMGCOND_E2E_SDXL=1)."""
    if os.environ.get("IMGCOND_E2E_SDXL") != "1":
        pytest.skip("SDXL e2e tests need about 19 GB of RAM: set IMGCOND_E2E_SDXL=1 to run them")
    webui.stop_all()  # the SDXL tests run last: no other server is needed again
    yield from _serve(webui.ForgeServer(forge.checkpoint("sdxl"), with_extension=True))


@pytest.fixture(scope="session")
def baseline(sd15_ckpt):
    """Render fixed requests on a Forge started with --disable-extra-extensions, then stop it (saves memory)."""
    srv = webui.ForgeServer(sd15_ckpt, with_extension=False).start()
    try:
        txt = srv.generate(forge.payload())
        init = forge.encode(txt.image)
        img = srv.generate(forge.payload(init_images=[init], denoising_strength=0.6), mode="img2img")
        hires = srv.generate(forge.payload(enable_hr=True))
        nans = srv.nan_lines()
        assert not nans, "the baseline server logged NaN:\n" + "\n".join(nans[:10])
        return {"txt2img": txt.image, "img2img": img.image, "init": init, "hires": hires.image}
    finally:
        srv.cleanup()


@pytest.fixture(scope="module")
def unclip_server():
    """Forge 2.0 with this extension and a random SD2.1-unclip-h checkpoint (Forge Neo cannot load one)."""
    if forge.is_neo():
        pytest.skip("Forge Neo cannot load SD2.1 unCLIP checkpoints: its model detection has no SD2.x models at all")
    yield from _serve(webui.ForgeServer(forge.checkpoint("sd21unclip_h"), with_extension=True))
