"""Which lib_imgcond modules are pure, by the layout rule that docs/architecture.md states.

* `host/` (the Forge adapters every technique shares) and `webui/` (Gradio panels, the scripts' mixin, X/Y/Z hooks)
  are host code as a whole.
* Everywhere else (the technique packages and the shared pure layers `common/`, `memory/`, `spec/`, `vision/`), a
  module whose name starts with `forge_` is a host adapter and every other module is pure.

Pure modules import no WebUI, backend, Gradio or model-library code (`FORBIDDEN`), and no host module.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lib_imgcond"
HOST_PACKAGES = {"host", "webui"}
ADAPTER_PREFIX = "forge_"
FORBIDDEN = {"modules", "backend", "gradio", "ldm_patched", "modules_forge", "transformers", "diffusers"}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_pure(name: str, host_packages: set[str] = HOST_PACKAGES) -> bool:
    """True for a module the rule calls pure (`name` is a dotted module name, `lib_imgcond.<layer>.<module>`)."""
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in host_packages:
        return False
    return not parts[-1].startswith(ADAPTER_PREFIX)


def modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package: dotted name → file."""
    return {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}


def pure_files(root: Path = ROOT, package: str = PACKAGE) -> list[Path]:
    return [path for name, path in modules(root, package).items() if is_pure(name)]
