"""Which lib_imgcond the RefDrop benchmarks measure: `load_lib(folder)` imports it from the repository root (the
default) or from another checkout given with --lib, and returns its modules for the callers to pass on.

No benchmark module imports lib_imgcond at its top: `load_lib` puts ``folder`` first on sys.path, and that only
decides which copy is measured if it runs before the first import of lib_imgcond in the process. Once any module has
imported lib_imgcond, every later import returns that copy from sys.modules, and --lib would silently measure it
instead (or fail: the benchmarks run as scripts from benchmarks/, where lib_imgcond is not on the path).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Lib(NamedTuple):
    """The modules of the lib_imgcond under test."""

    rd: Any  # lib_imgcond.refdrop.layers
    reference: Any
    prefetch: Any
    checks: Any
    arena: Any  # lib_imgcond.memory.arena
    host: Any  # lib_imgcond.refdrop.forge_refdrop
    installer: Any  # lib_imgcond.refdrop.forge_install
    patch: Any  # lib_imgcond.refdrop.forge_patch
    library: Any  # lib_imgcond.refdrop.forge_library
    blocks: Any  # lib_imgcond.memory.host_blocks where the measured copy has it, else None
    folder: str  # the lib_imgcond package folder imported


def load_lib(folder: str) -> Lib:
    """Import lib_imgcond from ``folder`` (the repository root by default, or another copy to compare versions).

    Call it before anything imports lib_imgcond (see the module docstring)."""
    sys.path.insert(0, os.path.abspath(folder))
    modules = {  # imported one after the other, in this order
        name: importlib.import_module(f"lib_imgcond.{path}")
        for name, path in (
            ("rd", "refdrop.layers"),
            ("reference", "refdrop.reference"),
            ("prefetch", "refdrop.prefetch"),
            ("checks", "refdrop.checks"),
            ("arena", "memory.arena"),
            ("host", "refdrop.forge_refdrop"),
            ("installer", "refdrop.forge_install"),
            ("patch", "refdrop.forge_patch"),
            ("library", "refdrop.forge_library"),
        )
    }
    package = os.path.dirname(os.path.dirname(os.path.abspath(modules["host"].__file__)))
    lib = Lib(**modules, blocks=sys.modules.get("lib_imgcond.memory.host_blocks"), folder=package)
    logging.getLogger("sd_webui_imgcond").setLevel(logging.WARNING)
    return lib
