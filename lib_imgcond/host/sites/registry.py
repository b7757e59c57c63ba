"""Which module describes each DiT family's attention site (`dit_attention.Site`), imported only when asked for."""

from __future__ import annotations

import importlib

from lib_imgcond.host.dit_attention import Site

# family (host.forge.model_family) -> module of lib_imgcond.host.sites defining `SITE`
MODULES = {
    "zimage": "lumina",
    "lumina2": "lumina",
    "qwen_image": "qwen",
    "krea2": "krea",
    "ernie_image": "ernie",
    "anima": "anima",
    "wan": "wan",
    "pid": "pid",
}


def site(family: str) -> Site | None:
    """The family's attention site, or None when RefDrop has none for it."""
    name = MODULES.get(family)
    return None if name is None else importlib.import_module(f"lib_imgcond.host.sites.{name}").SITE
