"""lib_imgcond/core must stay pure: no WebUI, backend or Gradio imports (so it is testable and host-independent)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "lib_imgcond" / "core"
FORBIDDEN = {"modules", "backend", "gradio", "ldm_patched", "modules_forge", "transformers", "diffusers"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                roots.add(arg.value.split(".")[0])
    return roots


CORE_FILES = sorted(CORE.glob("**/*.py"))


@pytest.mark.parametrize("path", CORE_FILES, ids=[p.name for p in CORE_FILES])
def test_core_module_is_pure(path):
    bad = imported_roots(path) & FORBIDDEN
    assert not bad, f"{path.name} imports {sorted(bad)}; keep WebUI code in lib_imgcond/hosts or lib_imgcond/ui"


def test_checker_catches_forbidden_imports(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("import torch\nfrom modules import shared\nimport backend.attention as a\nx = __import__('gradio')\n")
    assert imported_roots(f) & FORBIDDEN == {"modules", "backend", "gradio"}


def test_core_imports_cleanly_without_webui():
    import importlib
    import sys

    for path in CORE_FILES:
        name = "lib_imgcond.core" + ("" if path.stem == "__init__" else "." + path.stem)
        importlib.import_module(name)
    assert not {"modules", "backend", "gradio"} & set(sys.modules)
