"""The import graph of lib_imgcond: no cycles, pure modules below the host layer, no re-exports.

Every import counts: module level, inside functions, relative ones (resolved), and `importlib.import_module` /
`__import__` with a constant name. The purity rule is in tests/layout.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests import layout


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path, module: str) -> list[tuple[str, str | None, str | None, int]]:
    """(target module, imported name or None, bound name or None, line) for every import of the file."""
    out = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, a.asname, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, is_package, node)
            out += [(target, a.name, a.asname or a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.append((node.args[0].value, None, None, node.lineno))
    return out


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def build_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module → the package's modules it imports (an import also runs the target's parent packages)."""
    modules = layout.modules(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, imported, _, _ in _imports(path, name):
            if not (target == package or target.startswith(package + ".")):
                continue
            full = f"{target}.{imported}" if imported and f"{target}.{imported}" in modules else target
            for dep in (*_parents(full), full):
                if dep in modules and dep != name and dep not in _parents(name):
                    graph[name].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def purity_errors(root: Path, package: str) -> list[str]:
    """A pure module importing a forbidden root or a non-pure module of the package."""
    errors = []
    modules = layout.modules(root, package)
    for name, path in modules.items():
        if not layout.is_pure(name):
            continue
        for target, imported, _, line in _imports(path, name):
            if target.split(".")[0] in layout.FORBIDDEN:
                errors.append(f"{name}:{line} imports {target}")
            full = f"{target}.{imported}" if imported and f"{target}.{imported}" in modules else target
            if full in modules and not layout.is_pure(full):
                errors.append(f"{name}:{line} imports host module {full}")
    return errors


def _used_names(tree: ast.Module) -> set[str]:
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    for node in ast.walk(tree):  # string annotations
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations += [a.annotation for a in (*node.args.args, *node.args.kwonlyargs) if a.annotation]
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for ann in annotations:
            if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
                used |= {n.id for n in ast.walk(ast.parse(ann.value, mode="eval")) if isinstance(n, ast.Name)}
    return used


def _defined_names(tree: ast.Module) -> set[str]:
    defined = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                defined |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return defined


def _exported(tree: ast.Module) -> set[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
    return set()


def reexport_errors(root: Path, package: str) -> list[str]:
    """An import from the package whose name the module never uses, or an `__all__` entry it does not define."""
    errors = []
    for name, path in layout.modules(root, package).items():
        tree = ast.parse(path.read_text(), str(path))
        used, defined, exported = _used_names(tree), _defined_names(tree), _exported(tree)
        for target, imported, bound, line in _imports(path, name):
            if not bound or not (target == package or target.startswith(package + ".")):
                continue
            if bound not in used:
                errors.append(f"{name}:{line} imports {target}.{imported} without using it (a re-export?)")
        errors += [f"{name}: __all__ lists {n}, defined elsewhere" for n in sorted(exported - defined)]
    return errors


# --- the package ----------------------------------------------------------------------------------------------------


def test_no_import_cycles():
    cycle = find_cycle(build_graph(layout.ROOT, layout.PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_pure_modules_import_only_pure_modules():
    errors = purity_errors(layout.ROOT, layout.PACKAGE)
    assert not errors, "\n".join(errors)


def test_no_re_exports():
    errors = reexport_errors(layout.ROOT, layout.PACKAGE)
    assert not errors, "\n".join(errors)


def test_shared_layers_stay_below_the_techniques():
    """host/ (shared Forge adapters) builds on common/ only; webui/ (Gradio glue) is imported by nothing in the
    package (the scripts/ files use it)."""
    graph = build_graph(layout.ROOT, layout.PACKAGE)
    errors = []
    for name, deps in graph.items():
        layer = name.split(".")[1] if "." in name else ""
        for dep in deps:
            dep_layer = dep.split(".")[1] if "." in dep else ""
            if layer == "host" and dep_layer not in ("", "common", "host"):
                errors.append(f"{name} imports {dep}")
            if dep_layer == "webui" and layer != "webui":
                errors.append(f"{name} imports {dep}")
    assert not errors, "\n".join(errors)


def test_modules_stay_small():
    """Split by concern before a module passes 400 lines (it carries on test_refdrop_store_split's size check)."""
    long = {n: len(p.read_text().splitlines()) for n, p in layout.modules().items()}
    assert not {n: k for n, k in long.items() if k >= 400}


def test_graph_sees_every_module():
    graph = build_graph(layout.ROOT, layout.PACKAGE)
    assert "lib_imgcond.refdrop.layers" in graph["lib_imgcond.refdrop.forge_refdrop"]
    assert "lib_imgcond.refdrop.forge_dit" in graph["lib_imgcond.refdrop.forge_refdrop"]  # imported in a function


# --- the checker on small packages ----------------------------------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in {"pkg/__init__.py": "", **files}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checker_finds_a_cycle_through_a_function_import(tmp_path):
    root = _package(
        tmp_path,
        {
            "pkg/a.py": "from pkg import b\n\nX = b.Y\n",
            "pkg/b.py": "Y = 1\n\ndef f():\n    from . import c\n    return c.Z\n",
            "pkg/c.py": "from pkg.a import X\n\nZ = X\n",
        },
    )
    assert find_cycle(build_graph(root, "pkg")) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]


def test_checker_passes_a_clean_package(tmp_path):
    root = _package(tmp_path, {"pkg/a.py": "from pkg.b import Y\n\nX = Y\n", "pkg/b.py": "Y = 1\n"})
    assert find_cycle(build_graph(root, "pkg")) is None
    assert reexport_errors(root, "pkg") == []


def test_checker_finds_re_exports(tmp_path):
    root = _package(
        tmp_path,
        {
            "pkg/a.py": "def f():\n    return 1\n",
            "pkg/b.py": "from pkg.a import f  # noqa: F401\n",
            "pkg/c.py": 'from pkg.a import f\n\n__all__ = ["f"]\n',
        },
    )
    errors = reexport_errors(root, "pkg")
    assert any(e.startswith("pkg.b:1 imports pkg.a.f") for e in errors), errors
    assert "pkg.c: __all__ lists f, defined elsewhere" in errors


def test_checker_finds_a_pure_module_importing_host_code(tmp_path):
    root = _package(
        tmp_path,
        {
            "pkg/tech/__init__.py": "",
            "pkg/tech/maths.py": (
                "import gradio\n\ndef g():\n    from pkg.tech import forge_tech\n    return forge_tech\n"
            ),
            "pkg/tech/forge_tech.py": "",
        },
    )
    errors = purity_errors(root, "pkg")
    assert errors == ["pkg.tech.maths:1 imports gradio", "pkg.tech.maths:4 imports host module pkg.tech.forge_tech"]
