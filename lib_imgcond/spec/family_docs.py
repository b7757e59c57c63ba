"""The family × technique table of README.md and the per-technique details of docs/compatibility.md, rendered from
`spec/families.py` and the techniques' own FAMILIES (which `spec/forge_families.py` reads and passes in).

Both live between markers: `<!-- families:table -->` … `<!-- /families:table -->` in README.md and
`<!-- families:details -->` … `<!-- /families:details -->` in docs/compatibility.md. The host side's `main` checks or
rewrites them (`python -m lib_imgcond.spec.forge_families [--write]`); tests/glue/test_family_table.py fails when
they are stale.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from lib_imgcond.spec.families import HOSTS, KINDS, ROOT, TECHNIQUES, Cell, Tested, cells, loaded

PAGES = {"table": "README.md", "details": "docs/compatibility.md"}  # block -> page, relative to ROOT
YES, NO = "✓", "—"


def rows(labels: Mapping[str, str]) -> list[str]:
    """The table's families: every family some host loads, in the order of `labels` (host.forge.FAMILY_LABELS)."""
    hosted = set(loaded())
    unknown = hosted - set(labels)
    if unknown:
        raise ValueError(f"HOSTS names families the host code does not know: {sorted(unknown)}")
    return [f for f in labels if f in hosted]


def table(served: Mapping[str, Iterable[str]], labels: Mapping[str, str]) -> str:
    families = rows(labels)
    grid = cells(served, families)
    head = ["family", *HOSTS, *(t.label for t in TECHNIQUES.values())]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for family in families:
        hosts = [YES if family in loaded_by else NO for loaded_by in HOSTS.values()]
        techs = [_short(grid[key, family]) for key in TECHNIQUES]
        lines.append(f"| {labels[family]} | " + " | ".join(hosts + techs) + " |")
    kinds = "; ".join(f"**{kind}**: works, tested {how}" for kind, how in KINDS.items())
    legend = (
        f"{YES}: the host loads it. {kinds}. {NO}: refused before sampling; why: "
        "[docs/compatibility.md](docs/compatibility.md#families)."
    )
    return "\n".join(lines) + "\n\n" + legend


def _short(cell: Cell) -> str:
    return cell.tested.kind if cell.served and cell.tested else NO


def details(served: Mapping[str, Iterable[str]], labels: Mapping[str, str]) -> str:
    families = rows(labels)
    grid = cells(served, families)
    out = []
    for key, technique in TECHNIQUES.items():
        by_test: dict[Tested, list[str]] = {}
        by_reason: dict[str, list[str]] = {}
        for family in families:
            cell = grid[key, family]
            if cell.served:
                by_test.setdefault(cell.tested, []).append(labels[family])
            else:
                by_reason.setdefault(cell.reason, []).append(labels[family])
        works = "; ".join(f"{', '.join(names)} ({_test_link(t)})" for t, names in by_test.items())
        out.append(f"**{technique.label}** works on {works or 'no family'}.")
        for reason, names in by_reason.items():
            out.append(f"- Refused on {', '.join(names)}: {reason}.")
        out.append("")
    return "\n".join(out).rstrip()


def _test_link(tested: Tested) -> str:
    page = ROOT / PAGES["details"]
    rel = Path(os.path.relpath(tested.path, page.parent)).as_posix()
    name = f" `{tested.function}`" if tested.function else ""
    return f"{tested.kind}: [{tested.path.name}]({rel}){name}"


def _marker(block: str) -> re.Pattern:
    return re.compile(rf"(<!-- families:{block} -->)(.*?)(<!-- /families:{block} -->)", re.S)


def render(text: str, block: str, served: Mapping[str, Iterable[str]], labels: Mapping[str, str]) -> str:
    """`text` with its `block` ("table" or "details") brought up to date (ValueError when its markers are missing)."""
    pattern = _marker(block)
    if not pattern.search(text):
        raise ValueError(f"no <!-- families:{block} --> … <!-- /families:{block} --> block")
    body = table(served, labels) if block == "table" else details(served, labels)
    return pattern.sub(lambda m: f"{m.group(1)}\n{body}\n{m.group(3)}", text)


def stale_pages(served: Mapping[str, Iterable[str]], labels: Mapping[str, str], write: bool = False) -> list[str]:
    """The pages whose block is not current (rewritten when `write`)."""
    stale = []
    for block, rel in PAGES.items():
        path = ROOT / rel
        current = path.read_text(encoding="utf-8")
        try:
            fresh = render(current, block, served, labels)
        except ValueError as e:
            raise ValueError(f"{rel}: {e}") from None
        if fresh != current:
            if write:
                path.write_text(fresh, encoding="utf-8")
            else:
                stale.append(rel)
    return stale
