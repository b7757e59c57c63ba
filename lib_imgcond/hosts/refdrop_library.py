"""RefDrop's reference library: references in RAM (this WebUI process) and their files in the models folder.

Names are checked once here; a file that cannot be read is listed as broken (never hides the others) and can still
be deleted. Deleting or replacing a reference gives its host memory back (`store.trim_host_memory`).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from lib_imgcond.core import refdrop_store as store
from lib_imgcond.core import refdrop_trajectory as rtraj
from lib_imgcond.core.errors import ArgumentError, ImgcondError
from lib_imgcond.hosts import forge

_LOCK = threading.Lock()
REFERENCES: dict[str, store.Reference | rtraj.Trajectory] = {}  # RAM references by name, for this WebUI process


def references_dir() -> str:
    return forge.models_dir("imgcond", "refdrop")


def _file(name: str) -> str:
    return os.path.join(references_dir(), f"{name}.safetensors")


def check_name(name: str) -> str:
    name = name.strip()
    if not name or any(c in name for c in '/\\:*?"<>|') or name.startswith("."):
        raise ArgumentError("refdrop.reference", name, 'a non-empty name without / \\ : * ? " < > |')
    return name


def saved_names() -> list[str]:
    folder = references_dir()
    return sorted(f[: -len(".safetensors")] for f in os.listdir(folder) if f.endswith(".safetensors"))


def all_names() -> list[str]:
    return sorted(set(REFERENCES) | set(saved_names()))


def lookup(name: str) -> store.Reference:
    """A reference by name: from RAM, else loaded from its file (then kept in RAM)."""
    with _LOCK:
        ref = REFERENCES.get(name)
        if ref is None:
            path = _file(name)
            if not os.path.exists(path):
                known = ", ".join(all_names()) or "none yet"
                raise ImgcondError(
                    f"RefDrop reference '{name}' does not exist (known: {known}). Record it first: mode Record."
                )
            ref = rtraj.load(path)
            REFERENCES[name] = ref
        return ref


def save(name: str) -> str:
    ref = lookup(name)
    path = _file(name)
    rtraj.save(ref, path)
    return path


def delete(name: str) -> bool:
    with _LOCK:
        found = REFERENCES.pop(name, None) is not None
        path = _file(name)
        if os.path.exists(path):
            os.remove(path)
            found = True
    if found:
        store.trim_host_memory()
    return found


_INFO_KEYS = ("family", "bytes", "steps", "width", "height", "layers", "storage")


def describe() -> list[dict[str, Any]]:
    """Name, where it lives, size, model family, steps and size of every reference (for the UI and the API). A file
    that cannot be read is listed too, with `broken` saying why (None for readable ones), so one bad file never
    hides the others; Use of it gives the same reason, and delete works on it."""
    out = []
    saved = set(saved_names())
    for name in all_names():
        ref = REFERENCES.get(name)
        broken = None
        if ref is not None:
            info = {"family": ref.family, "bytes": ref.nbytes, "steps": dict(ref.meta.get("steps", {}))}
            info.update(width=ref.meta.get("width"), height=ref.meta.get("height"), layers=ref.meta.get("layers"))
            info["storage"] = rtraj.storage(ref)
        else:
            try:
                info = rtraj.info(_file(name))
                info["bytes"] = info.get("size_bytes")
            except (ImgcondError, OSError) as e:
                info, broken = {}, str(e)
            info = {k: info.get(k) for k in _INFO_KEYS}
        info.update(name=name, in_ram=ref is not None, saved=name in saved, broken=broken)
        info["size"] = store.format_bytes(int(info.get("bytes") or 0))
        out.append(info)
    return out
