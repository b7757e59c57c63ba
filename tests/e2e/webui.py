"""A real headless WebUI server (Forge 2.0 or Neo) for the e2e suite and the browser tier: start, stop, HTTP, log.

Each server gets its own data folder (config, outputs, models/ for the extension's files, extensions/ with this
repository linked in), so the WebUI folder itself is never modified. The installation, the checkpoints and the
request helpers are in tests/e2e/forge.py.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.e2e import forge, guard
from tests.e2e.forge import GenerationError, Result

# Servers run in their own session (so a signal to the suite's terminal does not reach them half-way); every exit
# path of the suite therefore kills their process groups: normal exit (atexit), SIGTERM/SIGINT, pytest's session
# finish (conftest), and the parent dying outright (PR_SET_PDEATHSIG on the server process).
_LIVE: set[ForgeServer] = set()
NEEDS_GIB = {"sd15": 8.0, "sdxl": 20.0}  # a server's peak RSS (measured 7.2 / 19 GB) plus a little


def stop_all() -> None:
    for srv in list(_LIVE):
        srv.stop()


def _on_signal(signum, frame):
    """Stop the servers, then end the suite as the signal would have. Not by raising SystemExit: pytest reports that
    as one failed test and runs on (a "stopped" suite went on starting servers beside the next one)."""
    stop_all()
    previous = _PREVIOUS.get(signum)
    if callable(previous):  # SIGINT: Python's KeyboardInterrupt, which pytest ends the session on
        previous(signum, frame)
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


_PREVIOUS = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
atexit.register(stop_all)


def _die_with_parent() -> None:
    """In the server process before exec: be killed when the suite's process dies (Linux)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ForgeServer:
    """One headless Forge (`--nowebui`, loopback, CPU) with or without this extension; `ui=True` serves the WebUI's
    pages as well (with its API at the same address), for the browser tier."""

    def __init__(self, ckpt: Path, with_extension: bool = True, data_dir: Path | None = None, ui: bool = False):
        self.forge_dir, self.python = forge.forge_paths()
        self.ckpt = ckpt
        self.with_extension = with_extension
        self.ui = ui
        self.own_data_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="imgcond-forge-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> ForgeServer:
        need = NEEDS_GIB["sdxl" if "sdxl" in self.ckpt.name.lower() else "sd15"]
        have = available_gib()
        if have < need:
            raise RuntimeError(
                f"not starting a WebUI server: {have:.1f} GiB of RAM available, it needs about {need:.0f} GiB "
                "(is another server or suite still running? stop it by its PID)"
            )
        (self.data_dir / "extensions").mkdir(parents=True, exist_ok=True)
        # A WebUI's data folder has tmp/ (its default temp_dir); Neo saves result images there without creating it
        (self.data_dir / "tmp").mkdir(exist_ok=True)
        link = self.data_dir / "extensions" / forge.EXT_NAME
        if self.with_extension and not link.exists():
            link.symlink_to(forge.REPO, target_is_directory=True)
        config = self.data_dir / "config.json"
        settings = json.loads(config.read_text()) if config.exists() else {}
        settings.update(
            live_previews_enable=False, samples_save=False, grid_save=False, save_images_before_face_restoration=False
        )
        neo = forge.host_kind(self.forge_dir) == "neo"
        if neo:
            settings["VERSION_UID"] = forge.neo_version_uid(self.forge_dir)
        config.write_text(json.dumps(settings))
        common = [
            str(self.python), "launch.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
            "--api" if self.ui else "--nowebui", "--server-name", "127.0.0.1", "--port", str(self.port),
            "--data-dir", str(self.data_dir),
            "--no-hashing",
        ]  # fmt: skip
        if neo:  # Neo loads the first checkpoint of its folders: a folder holding only ours
            ckpts = self.data_dir / "checkpoints"
            ckpts.mkdir(exist_ok=True)
            if not (ckpts / self.ckpt.name).exists():
                (ckpts / self.ckpt.name).symlink_to(self.ckpt.resolve())
            args = [*common, "--cpu", "--skip-python-version-check", "--ckpt-dirs", str(ckpts)]
        else:
            args = [*common, "--always-cpu", "--ckpt-dir", str(self.ckpt.parent), "--ckpt", str(self.ckpt)]
            args.append("--no-download-sd-model")  # NaN check on, as users run it: a NaN generation fails loudly
        if self.ui:  # its own pages' scripts and styles live in the WebUI folder, outside the data folder
            args += ["--gradio-allowed-path", str(self.forge_dir)]
        if not self.with_extension:
            args.append("--disable-extra-extensions")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, cwd=self.forge_dir, env=forge.offline_env(), stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
        _LIVE.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Forge exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                self.get("/sdapi/v1/options", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"Forge did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        _LIVE.discard(self)
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        if getattr(self, "_log", None):
            self._log.close()

    def restart(self) -> ForgeServer:
        self.stop()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        if self.log_path.exists():
            logs = forge.cache_dir() / "logs"
            logs.mkdir(exist_ok=True)
            shutil.copy(self.log_path, logs / f"{self.data_dir.name}.log")
        if self.own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # --- HTTP -------------------------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def delete(self, path: str, timeout: float = 60):
        req = urllib.request.Request(self.url + path, method="DELETE")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 900) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, {"raw": body.decode(errors="replace")}

    def generate(self, payload: dict, mode: str = "txt2img") -> Result:
        status, body = self.post(f"/sdapi/v1/{mode}", payload)
        if status != 200:
            raise GenerationError(status, body)
        return Result(body)

    def generate_error(self, payload: dict, mode: str = "txt2img") -> str:
        """Run a request expected to fail; return the error text the API gave."""
        status, body = self.post(f"/sdapi/v1/{mode}", payload)
        if status == 200:
            raise AssertionError("the request succeeded but an error was expected")
        return json.dumps(body)

    # --- log --------------------------------------------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def extension_tracebacks(
        self, expected: tuple[str, ...] = ("ImgcondError", "ArgumentError"), text=None
    ) -> list[str]:
        """Tracebacks in the server log that mention this extension, except the user errors it raises on purpose.
        Chained tracebacks ("direct cause", "during handling") count as one report."""
        reports: list[str] = []
        for block in re.split(r"(?=Traceback \(most recent call last\))", self.log_text() if text is None else text):
            if not block.startswith("Traceback"):
                continue
            tail = reports[-1].rstrip() if reports else ""
            chained = tail.endswith(("the following exception:", "another exception occurred:"))
            if chained:
                reports[-1] += block
            else:
                reports.append(block)
        out = []
        for report in reports:
            if "do_read_info_from_repo" in report:
                continue  # Forge reading git info of a checkout without an 'origin' remote: not ours
            if forge.OURS.search(report) and not any(e in report for e in expected):
                out.append(report[:4000])
        return out

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def nan_lines(self, since: int = 0) -> list[str]:
        """Lines of the server log (from byte `since`) where the host reported NaN (guard.NAN_LOG)."""
        if not self.log_path.exists():
            return guard.nan_lines("")
        with open(self.log_path, "rb") as f:
            f.seek(since)
            return guard.nan_lines(f.read().decode(errors="replace"))

    def startup_log(self) -> str:
        text = self.log_text()
        end = text.find("Startup time:")
        return text if end < 0 else text[:end]


def rss_mib(srv: ForgeServer) -> float:
    """The server process's resident memory (MiB), from /proc."""
    for line in Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")
