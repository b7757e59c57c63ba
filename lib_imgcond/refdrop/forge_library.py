"""RefDrop's reference library: references in RAM (this WebUI process) and their files in the models folder.

Names are checked once here; a file that cannot be read is listed as broken (never hides the others) and can still
be deleted. Deleting or replacing a reference gives its host memory back (`store.trim_host_memory`).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.host import forge
from lib_imgcond.memory import arena
from lib_imgcond.refdrop import checks, reference
from lib_imgcond.refdrop import trajectory as rtraj

_LOCK = threading.Lock()
REFERENCES: dict[str, reference.Reference | rtraj.Trajectory] = {}  # RAM references by name, for this WebUI process


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


def lookup(name: str) -> reference.Reference:
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
            ref = rtraj.load(path, name=name)  # known by its file's name (renamed or copied files)
            REFERENCES[name] = ref
        return ref


def _on_gpu(ref: Any) -> bool:
    device = getattr(ref, "device", None)
    return device is not None and device.type == "cuda"


def gpu_for(device: Any, needed: int, share: float, replacing: str) -> torch.device | None:
    """The GPU (the sampling `device`, if one) a new recording of about `needed` bytes stays on, or None for RAM:
    within `share` of its memory for every recording kept there (the one it replaces not counted), leaving a quarter
    of it free."""
    if share <= 0 or device is None or torch.device(device).type != "cuda":
        return None
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
    with _LOCK:
        held = sum(r.nbytes for n, r in REFERENCES.items() if n != replacing and _on_gpu(r) and r.device == device)
    return device if checks.fits_on_device(needed, held, free, total, share) else None


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
        arena.trim_host_memory()
    return found


def rename(old: str, new: str) -> dict[str, Any]:
    """Rename a reference in RAM and its file (the file's name is the reference's name; see `lookup`)."""
    old, new = check_name(old), check_name(new)
    with _LOCK:
        path, target = _file(old), _file(new)
        in_ram, saved = old in REFERENCES, os.path.exists(path)
        if not in_ram and not saved:
            known = ", ".join(all_names()) or "none yet"
            raise ImgcondError(f"RefDrop reference '{old}' does not exist (known: {known}); nothing was renamed")
        if new == old:
            return {"renamed": False, "name": new}
        if new in REFERENCES or os.path.exists(target):
            raise ImgcondError(f"RefDrop reference '{new}' already exists; delete it first or pick another name")
        if saved:
            os.replace(path, target)
        if in_ram:
            ref = REFERENCES.pop(old)
            ref.name = new
            REFERENCES[new] = ref
    return {"renamed": True, "name": new}


_INFO_KEYS = ("family", "steps", "width", "height", "layers", "precision", "record_every", "thumbnail", "storage")


def describe() -> list[dict[str, Any]]:
    """Every reference (for the UI and the API): name, model family, size (in memory, else of its file), sampling
    steps, resolution, where it is kept (`kept`: RAM or GPU memory, file, or both; `on_gpu`), storage precision, the
    step subset it kept (`record_every`), and a thumbnail of the recorded image (a `data:image/jpeg;base64,…` URI,
    "" when none). A file that cannot be read is listed too, with `broken` saying why (None for readable ones), so
    one bad file never hides the others; Use of it gives the same reason, and delete works on it."""
    out = []
    saved = set(saved_names())
    for name in all_names():
        ref = REFERENCES.get(name)
        broken = None
        if ref is not None:
            m = ref.meta
            info = {k: m.get(k) for k in ("width", "height", "layers", "thumbnail")}
            info.update(family=ref.family, bytes=ref.nbytes, steps=dict(m.get("steps", {})))
            info.update(precision=getattr(ref, "precision", None), storage=rtraj.storage(ref))
            info["record_every"] = int(m.get("record_every") or 1)
        else:
            try:
                info = rtraj.info(_file(name))
            except (ImgcondError, OSError) as e:
                info, broken = {}, str(e)
            info = {k: info.get(k) for k in _INFO_KEYS} | {"bytes": info.get("size_bytes")}
        info.update(name=name, in_ram=ref is not None, on_gpu=_on_gpu(ref), saved=name in saved, broken=broken)
        held = (("GPU" if info["on_gpu"] else "RAM", info["in_ram"]), ("file", info["saved"]))
        info["kept"] = " + ".join(w for w, on in held if on)
        info["size"] = arena.format_bytes(int(info.get("bytes") or 0))
        info["resolution"] = f"{info['width']}×{info['height']}" if info.get("width") else ""
        info["thumbnail"] = info.get("thumbnail") or ""
        out.append(info)
    return out


THUMBNAIL_PX = 128


def make_thumbnail(image: Any, px: int = THUMBNAIL_PX) -> str:
    """A small JPEG of a PIL image (longest side `px`) as a data URI, kept in the reference's metadata."""
    import base64
    import io

    small = image.convert("RGB")
    small.thumbnail((px, px))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail_image(uri: str) -> Any:
    """The PIL image of a thumbnail data URI; None when there is none or it cannot be read."""
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    head, sep, data = (uri or "").partition(",")
    if not sep or not head.startswith("data:image/"):
        return None
    try:
        return Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError):
        return None
