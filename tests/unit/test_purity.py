"""Pure modules of lib_imgcond (the rule is in tests/layout.py) import no WebUI, backend or Gradio code (so they are
testable and host-independent)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests import layout
from tests.layout import FORBIDDEN


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


PURE_FILES = layout.pure_files()


@pytest.mark.parametrize("path", PURE_FILES, ids=[layout.module_name(p) for p in PURE_FILES])
def test_pure_module_is_pure(path):
    bad = imported_roots(path) & FORBIDDEN
    assert not bad, f"{path.name} imports {sorted(bad)}; keep WebUI code in forge_*.py adapters, host/ or webui/"


def test_every_layer_has_pure_modules():
    names = {layout.module_name(p) for p in PURE_FILES}
    for layer in ("common", "memory", "spec", "vision", "refdrop", "redux", "mixing", "flexdiffuse", "style", "unclip"):
        assert any(n.startswith(f"lib_imgcond.{layer}.") for n in names), layer
    assert not any(n.split(".")[-1].startswith("forge_") for n in names)
    assert not any(n.split(".")[1] in ("host", "webui") for n in names if "." in n)


def test_checker_catches_forbidden_imports(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("import torch\nfrom modules import shared\nimport backend.attention as a\nx = __import__('gradio')\n")
    assert imported_roots(f) & FORBIDDEN == {"modules", "backend", "gradio"}


def test_rule_sorts_modules():
    assert layout.is_pure("lib_imgcond.refdrop.layers")
    assert layout.is_pure("lib_imgcond.spec.api_docs")
    assert not layout.is_pure("lib_imgcond.refdrop.forge_refdrop")
    assert not layout.is_pure("lib_imgcond.host.progress")
    assert not layout.is_pure("lib_imgcond.webui.panel")


def test_pure_modules_import_cleanly_without_webui():
    import importlib
    import sys

    for path in PURE_FILES:
        importlib.import_module(layout.module_name(path))
    assert not {"modules", "backend", "gradio"} & set(sys.modules)
