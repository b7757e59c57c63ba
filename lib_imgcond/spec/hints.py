"""The panels' hover hints as a JavaScript file, generated from the specs (the specs stay the single source).

Every parameter of every technique has a `hint` (its full help; the panel shows only the short `info` under the
control) and every spec names its other controls' hints (`Spec.controls`: buttons, previews, the enable switch).
This module writes them into `javascript/imgcond_hints.js` as one map, element id without its tab suffix -> hint;
`javascript/imgcond_ui.js` puts each hint into the `title` of the element `<id>_txt2img` / `<id>_img2img` whenever
that element is in the page (the WebUI loads every extension's javascript/*.js).

    python -m lib_imgcond.spec.hints          # check the file (exit status 1 when it is stale)
    python -m lib_imgcond.spec.hints --write  # rewrite it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lib_imgcond.spec.api_docs import SPECS
from lib_imgcond.spec.params import Spec

ROOT = Path(__file__).resolve().parents[2]
HINTS_JS = ROOT / "javascript" / "imgcond_hints.js"
TABS = ("txt2img", "img2img")
HEADER = """// Hover hints of the sd-webui-imgcond panels: element id (without _txt2img / _img2img) -> hint.
// Generated from the specs (lib_imgcond/*/spec.py) by `python -m lib_imgcond.spec.hints --write`: do not edit.
// javascript/imgcond_ui.js puts them into the elements' titles."""


def stem(spec: Spec, name: str) -> str:
    """The element id of control `name` without its tab suffix (see `Spec.elem_id`)."""
    full = spec.elem_id(name, TABS[0])
    return full[: -len(TABS[0]) - 1]


def check(spec: Spec) -> None:
    """Every parameter and control has a non-empty, one-line hint (else ValueError naming them)."""
    bad = [name for name, hint in spec.hints().items() if not hint.strip() or "\n" in hint]
    if bad:
        raise ValueError(f"{spec.prefix}: no hint (or a hint over several lines) for {bad}")


def hint_map(specs: tuple[Spec, ...] = SPECS) -> dict[str, str]:
    """Element id stem -> hint, for every control of every panel, in spec order."""
    out: dict[str, str] = {}
    for spec in specs:
        check(spec)
        for name, hint in spec.hints().items():
            out[stem(spec, name)] = hint
    return out


def render(specs: tuple[Spec, ...] = SPECS) -> str:
    """The text of javascript/imgcond_hints.js."""
    lines = [f"    {json.dumps(key)}: {json.dumps(hint, ensure_ascii=False)}," for key, hint in hint_map(specs).items()]
    return "\n".join([HEADER, "window.imgcondHints = {", *lines, "};", ""])


def main(argv: list[str]) -> int:
    fresh = render()
    current = HINTS_JS.read_text(encoding="utf-8") if HINTS_JS.exists() else ""
    if fresh == current:
        return 0
    if "--write" in argv:
        HINTS_JS.parent.mkdir(exist_ok=True)
        HINTS_JS.write_text(fresh, encoding="utf-8")
        return 0
    sys.stderr.write(f"{HINTS_JS.relative_to(ROOT)} is stale: run python -m lib_imgcond.spec.hints --write\n")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
