"""Dependency check run by the WebUI launcher. Everything this extension needs ships with Forge (torch, numpy,
safetensors, Pillow, gradio), so nothing is installed; a clear message names anything missing or too old."""

from __future__ import annotations

import sys
from importlib import metadata

NEEDS = {"torch": "2.1", "numpy": "1.24", "safetensors": "0.4", "Pillow": "9.0"}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check() -> list[str]:
    problems = []
    for name, minimum in NEEDS.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed (need >= {minimum})")
            continue
        if _version_tuple(have) < _version_tuple(minimum):
            problems.append(f"{name} {have} is too old (need >= {minimum})")
    return problems


def main() -> None:
    try:
        import launch

        if getattr(getattr(launch, "args", None), "skip_install", False):
            return
    except ImportError:
        pass
    for problem in check():
        sys.stderr.write(f"[sd-webui-imgcond] {problem}; update your WebUI's environment.\n")


main()
