"""The families each technique serves, read from the techniques' own host adapters (their `FAMILIES`), for the
family table (spec/family_docs.py) and its checks.

    python -m lib_imgcond.spec.forge_families          # check README.md and docs/compatibility.md (exit 1: stale)
    python -m lib_imgcond.spec.forge_families --write  # rewrite their family blocks
"""

from __future__ import annotations

import sys

from lib_imgcond.flexdiffuse import forge_flexdiffuse
from lib_imgcond.host.forge import FAMILY_LABELS
from lib_imgcond.mixing import forge_mixing
from lib_imgcond.redux import forge_redux
from lib_imgcond.refdrop import forge_refdrop
from lib_imgcond.spec import family_docs
from lib_imgcond.style import forge_style
from lib_imgcond.unclip import forge_unclip

# technique (spec prefix) -> the module whose FAMILIES it serves
MODULES = {
    "refdrop": forge_refdrop,
    "redux": forge_redux,
    "hrmix": forge_mixing,
    "flexdiffuse": forge_flexdiffuse,
    "style_model": forge_style,
    "unclip": forge_unclip,
}


def served() -> dict[str, tuple[str, ...]]:
    """Technique -> the families it serves, as its code says right now."""
    return {key: tuple(module.FAMILIES) for key, module in MODULES.items()}


def main(argv: list[str]) -> int:
    stale = family_docs.stale_pages(served(), FAMILY_LABELS, write="--write" in argv)
    if stale:
        sys.stderr.write(
            f"stale family table in {', '.join(stale)}: run python -m lib_imgcond.spec.forge_families --write\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
