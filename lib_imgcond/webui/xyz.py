"""X/Y/Z plot axes for spec parameters marked `xyz=True`."""

from __future__ import annotations

from typing import Any

from lib_imgcond.common.log import logger
from lib_imgcond.spec.params import Spec

_ATTR = "_imgcond_xyz"


def overrides(p: Any, spec: Spec) -> dict[str, Any]:
    """Values the X/Y/Z plot set for this job's cell."""
    return dict(getattr(p, _ATTR, {}).get(spec.prefix, {}))


def _setter(prefix: str, name: str):
    def apply(p, x, _xs):
        # copy on write: X/Y/Z cells are shallow copies of one `p`
        table = {k: dict(v) for k, v in getattr(p, _ATTR, {}).items()}
        table.setdefault(prefix, {})[name] = x
        setattr(p, _ATTR, table)

    return apply


def _confirm(prefix: str, param):
    """The host's `confirm(p, xs)` hook: every axis value is checked before the grid starts (ArgumentError names the
    argument, the value and what is allowed)."""

    def confirm(_p, xs):
        for x in xs:
            param.coerce(x, f"{prefix}.{param.name}")

    return confirm


def hook(spec: Spec, label: str, choices: dict[str, Any] | None = None) -> None:
    """Register the axes now and again before the UI is built (both idempotent). Now matters: the host's xyz_grid
    script loads before extension scripts, and an API-only server (`--nowebui`) fixes its X/Y/Z choices when it sets
    up the scripts, before any `on_before_ui` callback runs."""
    from modules import script_callbacks

    register_axes(spec, label, choices)
    script_callbacks.on_before_ui(lambda: register_axes(spec, label, choices))


def find_xyz_module():
    from modules import scripts

    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid") and hasattr(data, "module"):
            return data.module
    return None


def register_axes(spec: Spec, label: str, choices: dict[str, Any] | None = None) -> int:
    """Add `[label] <param label>` axes to the X/Y/Z plot once. `choices` maps a parameter name to a callable
    returning its current choices (e.g. saved reference names). Returns how many axes were added."""
    xyz = find_xyz_module()
    if xyz is None:
        return 0
    tag = f"[{label}] "
    if any(opt.label.startswith(tag) for opt in xyz.axis_options):
        return 0
    choices = choices or {}
    added = 0
    for param in spec.params:
        if not param.xyz:
            continue
        kind = {"float": float, "int": int}.get(param.kind, str)
        choice_fn = choices.get(param.name)
        if choice_fn is None and param.kind == "choice":
            choice_fn = lambda p=param: list(p.choices)  # noqa: E731
        xyz.axis_options.append(
            xyz.AxisOption(
                tag + param.label,
                kind,
                _setter(spec.prefix, param.name),
                confirm=_confirm(spec.prefix, param),
                choices=choice_fn,
            )
        )
        added += 1
    logger.debug("registered %d X/Y/Z axes for %s", added, label)
    return added
