"""The API reference of each technique (positional form and argument table), generated from the specs.

Names, order, kinds, defaults, ranges and choices come from the `Spec` of each technique; this module adds only the
prose (a meaning per argument, and the allowed values where a type alone does not say them). Every spec parameter
must have a meaning here (the spec's `hint` serves when it says enough) and every entry here must name a parameter,
so a parameter added, renamed or moved shows up as a stale reference page in `tests/unit/test_readme.py`.

    python -m lib_imgcond.spec.api_docs          # check the docs pages (exit status 1 when one is stale)
    python -m lib_imgcond.spec.api_docs --write  # rewrite their generated blocks

Each technique's block lives in its own page, `DOC_FILES[prefix]` (e.g. docs/refdrop.md), between
`<!-- api:<prefix> -->` and `<!-- /api:<prefix> -->`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from lib_imgcond.flexdiffuse.spec import SPEC as FLEX
from lib_imgcond.mixing.spec import SPEC as MIXING
from lib_imgcond.redux.spec import SLOTS
from lib_imgcond.redux.spec import SPEC as REDUX
from lib_imgcond.refdrop.spec import SPEC as REFDROP
from lib_imgcond.spec.api_prose import DOCS, EXTRA_ROWS, Doc
from lib_imgcond.spec.params import Param, Spec, _num
from lib_imgcond.style.spec import SPEC as STYLE
from lib_imgcond.unclip.spec import SPEC as UNCLIP

README = Path(__file__).resolve().parents[2] / "README.md"
SLOT = "k"  # how a slot-numbered parameter is written in the table: `imagek`
WIDTH = 120  # prose line width of the generated blocks
# the page each technique's generated block is written into, relative to the repository root (README.parent)
DOC_FILES: dict[str, str] = {
    "refdrop": "docs/refdrop.md",
    "hrmix": "docs/hires-mixing.md",
    "flexdiffuse": "docs/clip-guidance.md",
    "redux": "docs/redux.md",
    "style_model": "docs/style-model.md",
    "unclip": "docs/unclip.md",
}


SPECS: tuple[Spec, ...] = (REFDROP, MIXING, FLEX, REDUX, STYLE, UNCLIP)


# --- slots ----------------------------------------------------------------------------------------------------------
def _slot_base(name: str) -> str | None:
    m = re.fullmatch(r"(.*\D)([1-9])", name)
    return m.group(1) if m else None


def groups(spec: Spec) -> list[tuple[list[Param], int]]:
    """The parameters in positional order, a slot group (the same bases numbered 1…n, one number after the other)
    as one entry (its slot-1 parameters, n); other parameters as ([param], 1)."""
    params, out, i = spec.params, [], 0
    while i < len(params):
        first = []
        while i + len(first) < len(params) and params[i + len(first)].name.endswith("1"):
            base = _slot_base(params[i + len(first)].name)
            if base is None:
                break
            first.append(params[i + len(first)])
        bases = [_slot_base(p.name) for p in first]
        n, j = 1, i + len(first)
        while first and [p.name for p in params[j : j + len(first)]] == [f"{b}{n + 1}" for b in bases]:
            n, j = n + 1, j + len(first)
        if n > 1:
            out.append((first, n))
            i = j
        else:
            out.append(([params[i]], 1))
            i += 1
    return out


def _slot_name(param: Param, n: int) -> str:
    return f"{_slot_base(param.name)}{SLOT}" if n > 1 else param.name


# --- rendering ------------------------------------------------------------------------------------------------------
def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _allowed(param: Param, doc: Doc) -> str:
    if doc.allowed:
        return doc.allowed
    if param.kind == "bool":
        text = "`true`, `false`"
    elif param.kind in ("float", "int"):
        text = f"[{_num(param.minimum)}, {_num(param.maximum)}]"
        if param.kind == "int":
            text += ", integer"
        elif param.step is not None:
            text += f", step {_num(param.step)}"
    elif param.kind == "choice":
        text = ", ".join(f"`{_json(c)}`" for c in param.choices)
    elif param.kind == "image":
        text = "base64 image or null"
    else:
        text = "a string"
    return text + doc.note


def _meaning(spec: Spec, param: Param, n: int) -> str:
    doc = DOCS.get(spec.prefix, {}).get(_slot_base(param.name) if n > 1 else param.name, Doc())
    text = doc.meaning or param.hint or param.info
    return f"{text} (X/Y/Z axis)" if text and param.xyz else text


def _same_slots(spec: Spec, first: list[Param], n: int) -> bool:
    """Whether slots 2…n repeat slot 1 (kind, default, range, choices, flags); only then one row describes them."""
    for k in range(2, n + 1):
        for p in first:
            q = spec.by_name[f"{_slot_base(p.name)}{k}"]
            same = (q.kind, q.default, q.minimum, q.maximum, q.step, q.choices, q.infotext, q.xyz)
            if same != (p.kind, p.default, p.minimum, p.maximum, p.step, p.choices, p.infotext, p.xyz):
                return False
    return True


def check_docs(spec: Spec) -> None:
    """Every parameter has a meaning, every DOCS entry names a parameter and numbered slots repeat slot 1
    (else ValueError)."""
    if not all(_same_slots(spec, ps, n) for ps, n in groups(spec) if n > 1):
        raise ValueError(f"{spec.prefix}: numbered slots differ from slot 1; one table row cannot describe them")
    names = {_slot_base(p.name) if n > 1 else p.name for ps, n in groups(spec) for p in ps}
    extra = set(DOCS.get(spec.prefix, {})) - names
    missing = [p.name for ps, n in groups(spec) for p in ps if not _meaning(spec, p, n)]
    if extra or missing:
        raise ValueError(f"{spec.prefix}: DOCS entries without a parameter {sorted(extra)}, no meaning for {missing}")


def positional(spec: Spec) -> str:
    items = ["enabled"]
    for ps, n in groups(spec):
        if n > 1:
            items.append("{" + ", ".join(_slot_name(p, n) for p in ps) + f"}} for {SLOT} = 1…{n}")
        else:
            items.append(ps[0].name)
    return "[" + ", ".join(items) + "]"


def table(spec: Spec) -> str:
    check_docs(spec)
    rows = [
        "| name | type | default | allowed | meaning |",
        "|---|---|---|---|---|",
        "| `enabled` | bool | `false` (`true` in the dict form) | `true`, `false` | the technique is on |",
    ]
    for ps, n in groups(spec):
        for p in ps:
            doc = DOCS.get(spec.prefix, {}).get(_slot_base(p.name) if n > 1 else p.name, Doc())
            rows.append(
                f"| `{_slot_name(p, n)}` | {p.kind} | `{_json(p.default)}` | {_allowed(p, doc)} | "
                f"{_meaning(spec, p, n)} |"
            )
    for name, kind, default, allowed, meaning in EXTRA_ROWS.get(spec.prefix, []):
        rows.append(f"| `{name}` | {kind} | {default} | {allowed} | {meaning} |")
    return "\n".join(rows)


def block(spec: Spec) -> str:
    """The generated block of one technique (without its markers)."""
    slots = any(n > 1 for _, n in groups(spec))
    lead = f"Positional form (`{SLOT}` = 1…{SLOTS}: the slot number)" if slots else "Positional form"
    return f"{_wrap(f'{lead}: `{positional(spec)}`.')}\n\n{table(spec)}"


def _wrap(text: str, width: int = WIDTH) -> str:
    """Break a paragraph after ", " so no line exceeds `width` (a code span may continue on the next line)."""
    lines, line = [], ""
    for piece in re.split(r"(?<=, )", text):
        if line and len(line) + len(piece.rstrip()) > width:
            lines.append(line.rstrip())
            line = ""
        line += piece
    return "\n".join([*lines, line.rstrip()])


def _marker(prefix: str) -> re.Pattern:
    return re.compile(rf"(<!-- api:{re.escape(prefix)} -->)(.*?)(<!-- /api:{re.escape(prefix)} -->)", re.S)


def doc_path(prefix: str) -> Path:
    """The page holding the generated block of the technique `prefix`."""
    return README.parent / DOC_FILES[prefix]


def render(text: str, prefixes: list[str] | None = None) -> str:
    """`text` with the generated blocks of the techniques `prefixes` (default: every technique) brought up to date
    (ValueError when a block's markers are missing)."""
    for spec in SPECS:
        if prefixes is not None and spec.prefix not in prefixes:
            continue
        pattern = _marker(spec.prefix)
        if not pattern.search(text):
            raise ValueError(f"no <!-- api:{spec.prefix} --> … <!-- /api:{spec.prefix} --> block")
        text = pattern.sub(lambda m, s=spec: f"{m.group(1)}\n{block(s)}\n{m.group(3)}", text)
    return text


def pages() -> dict[Path, list[str]]:
    """Each page with a generated block, and the techniques whose blocks it holds (every spec needs a page)."""
    out: dict[Path, list[str]] = {}
    for spec in SPECS:
        if spec.prefix not in DOC_FILES:
            raise ValueError(f"{spec.prefix}: no page in DOC_FILES for its generated block")
        out.setdefault(doc_path(spec.prefix), []).append(spec.prefix)
    return out


def main(argv: list[str]) -> int:
    stale = []
    for path, prefixes in pages().items():
        current = path.read_text(encoding="utf-8")
        try:
            fresh = render(current, prefixes)
        except ValueError as e:
            raise ValueError(f"{path.relative_to(README.parent)}: {e}") from None
        if fresh != current:
            if "--write" in argv:
                path.write_text(fresh, encoding="utf-8")
            else:
                stale.append(str(path.relative_to(README.parent)))
    if stale:
        sys.stderr.write(f"stale API blocks in {', '.join(stale)}: run python -m lib_imgcond.spec.api_docs --write\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
