"""The e2e harness never leaves a WebUI server behind: its servers die with the suite however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e import forge, webui

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process-group and PDEATHSIG semantics are Linux's")

SUITE = """
import subprocess, sys, time
from tests.e2e import webui
child = subprocess.Popen(["sleep", "120"], start_new_session=True, preexec_fn=webui._die_with_parent)
srv = webui.ForgeServer.__new__(webui.ForgeServer)
srv.proc, srv._log = child, None
webui._LIVE.add(srv)
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _run_suite_then(sig: int) -> int:
    suite = subprocess.Popen([sys.executable, "-c", SUITE], stdout=subprocess.PIPE, text=True, cwd=forge.REPO)
    child = int(suite.stdout.readline())
    assert _alive(child)
    suite.send_signal(sig)
    suite.wait(30)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    return child


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_server_dies_with_the_suite(sig):
    child = _run_suite_then(sig)
    alive = _alive(child)
    if alive:
        os.killpg(child, signal.SIGKILL)
    assert not alive, f"the server outlived a suite ended by {signal.Signals(sig).name}"


def test_refuses_to_start_without_ram(monkeypatch, tmp_path):
    monkeypatch.setattr(webui, "available_gib", lambda: 3.0)
    monkeypatch.setattr(forge, "forge_paths", lambda: (tmp_path, tmp_path / "python"))
    srv = webui.ForgeServer(tmp_path / "imgcond-random-sd15.safetensors", data_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"3\.0 GiB of RAM available, it needs about 8 GiB"):
        srv.start()


HOST_ERROR = """Traceback (most recent call last):
  File "/venv/lib/python3.13/site-packages/gradio/components/gallery.py", line 208, in _save
FileNotFoundError: [Errno 2] No such file or directory: '/tmp/imgcond-forge-1a2b/tmp/tmp3c4d.png'
"""
OUR_ERROR = """Traceback (most recent call last):
  File "/tmp/imgcond-forge-1a2b/extensions/sd-webui-imgcond/lib_imgcond/host/forge.py", line 127, in refuse
KeyError: 'oops'
"""


def test_only_tracebacks_through_our_code_count(tmp_path):
    srv = webui.ForgeServer.__new__(webui.ForgeServer)
    found = srv.extension_tracebacks(text=HOST_ERROR + OUR_ERROR)
    assert len(found) == 1 and "KeyError" in found[0]
    assert not srv.extension_tracebacks(text=OUR_ERROR.replace("KeyError", "ImgcondError"))


SESSION = """
import time
from tests.e2e import webui

def test_a_long_one():
    print("started", flush=True)
    time.sleep(60)

def test_after_it():
    print("went on", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_suite_stops_instead_of_running_on(tmp_path, sig):
    """A suite ended by SIGTERM/SIGINT in the middle of a test ends; it does not run the next test."""
    (tmp_path / "test_session.py").write_text(SESSION)
    env = {**os.environ, "PYTHONPATH": str(forge.REPO)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(tmp_path / "test_session.py")]
    suite = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    for line in suite.stdout:
        if "started" in line:
            break
    suite.send_signal(sig)
    rest = suite.communicate(timeout=30)[0]
    assert "went on" not in rest, rest
    assert suite.returncode != 0
