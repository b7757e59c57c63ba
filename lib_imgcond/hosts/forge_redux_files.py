"""Flux Redux on Forge: the model files (SigLIP encoder, Redux projector), found in the models folders and loaded once.

Automatic choice ('' as the name) takes the first file whose header fits the slot, so a stray file in the folder does
not shadow the right one. Loaded models stay on the offload device and are cached one per kind.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from lib_imgcond.core import redux as rx
from lib_imgcond.core import vision as vs
from lib_imgcond.core.errors import ImgcondError
from lib_imgcond.hosts import forge
from lib_imgcond.log import logger

KINDS = {"siglip": "SigLIP vision model", "redux": "Redux model"}
EXTRA_DIRS_OPTION = "imgcond_redux_extra_dirs"
_LOCK = threading.Lock()
_MODELS: dict[str, tuple[tuple, Any]] = {}  # kind → (file key, model on the offload device)


def extra_dirs() -> list[str]:
    """Folders from the settings option (separated by ';' or new lines)."""
    try:
        from modules import shared

        text = str(getattr(shared.opts, EXTRA_DIRS_OPTION, "") or "")
    except Exception:  # no WebUI (tests)
        text = ""
    return [d.strip() for d in text.replace("\n", ";").split(";") if d.strip()]


def model_dirs(kind: str) -> list[str]:
    """models/imgcond/<kind>/ first, then each extra folder and its <kind>/ subfolder when present."""
    dirs = [forge.models_dir("imgcond", kind)]
    for d in extra_dirs():
        for cand in (os.path.join(d, kind), d):
            if os.path.isdir(cand) and cand not in dirs:
                dirs.append(cand)
    return dirs


def list_files(kind: str) -> list[str]:
    """Names of the .safetensors files of `kind`, in folder order then alphabetically, without duplicates."""
    out: list[str] = []
    for d in model_dirs(kind):
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        out += [n for n in names if n.lower().endswith(".safetensors") and n not in out]
    return out


def resolve(kind: str, name: str) -> str:
    """The path of model file `name` ('' = the first one found); ImgcondError naming the folders otherwise."""
    label, dirs = KINDS[kind], model_dirs(kind)
    where = " or ".join(dirs)
    name = (name or "").strip()
    if name and not name.lower().endswith(".safetensors"):
        raise ImgcondError(
            f"Redux: the {label} '{name}' is not a .safetensors file (only those are loaded from {where})"
        )
    if not name:
        files = list_files(kind)
        if not files:
            wanted = "sigclip_vision_patch14_384.safetensors" if kind == "siglip" else "flux1-redux-dev.safetensors"
            raise ImgcondError(f"Redux needs a {label}: no .safetensors file in {where}. Put {wanted} there.")
        return _first_valid(kind, [_find(dirs, n) for n in files])
    path = _find(dirs, name)
    if path is not None:
        return path
    raise ImgcondError(f"Redux: the {label} '{name}' was not found in {where}")


def _find(dirs: list[str], name: str) -> str | None:
    for d in dirs:
        path = os.path.join(d, os.path.basename(name))
        if os.path.isfile(path):
            return path
    return None


def _first_valid(kind: str, paths: list[str]) -> str:
    """Automatic choice: the first file whose header fits the slot (so a stray file does not shadow the right one)."""
    check = vision_config if kind == "siglip" else _check_redux_file
    first_error = None
    for path in paths:
        try:
            check(path)
            return path
        except ImgcondError as e:
            first_error = first_error or e
    raise first_error


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.abspath(path), st.st_mtime_ns, st.st_size)


def compute_device_dtype() -> tuple[torch.device, torch.dtype]:
    try:
        from backend import memory_management as mm

        device = mm.get_torch_device()
        fp16 = device.type == "cuda" and mm.should_use_fp16(device)
        return device, torch.float16 if fp16 else torch.float32
    except ImportError:
        return torch.device("cpu"), torch.float32


def _shapes(path: str) -> dict:
    try:
        return vs.read_shapes(path)
    except Exception as e:  # safetensors' own errors: truncated file, not a safetensors file, ...
        raise ImgcondError(f"Redux: {os.path.basename(path)} cannot be read as a .safetensors file ({e})") from None


def vision_config(path: str) -> vs.VisionConfig:
    """Architecture of a SigLIP file from its header; a clear error for any other file (CLIP, T5, ...)."""
    name = os.path.basename(path)
    try:
        cfg = vs.detect_config(_shapes(path), source=name)
    except ImgcondError as e:
        raise ImgcondError(f"Redux SigLIP vision model: {e}") from None
    vs.expect_kind(cfg, {"siglip"}, "Redux SigLIP vision model")
    return cfg


def _check_redux_file(path: str) -> None:
    keys = _shapes(path)
    if "redux_down.weight" not in keys:
        raise ImgcondError(
            f"Redux model: {os.path.basename(path)} looks like {vs.describe_keys(keys)}, expected the Flux Redux "
            "style model (flux1-redux-dev.safetensors)"
        )


def load_model(kind: str, path: str, dtype: torch.dtype) -> Any:
    """The loaded SigLIP / Redux model (cached: one per kind, reloaded when the file or dtype changes)."""
    from safetensors.torch import load_file

    key = (*_file_key(path), dtype)
    with _LOCK:
        cached = _MODELS.get(kind)
        if cached is not None and cached[0] == key:
            return cached[1]
        _MODELS.pop(kind, None)
        name = os.path.basename(path)
        if kind == "siglip":
            vision_config(path)
            model = vs.load_vision_model(load_file(path), dtype=dtype, source=name)
        else:
            _check_redux_file(path)
            model = rx.load_redux(load_file(path), dtype=dtype, source=name)
        _MODELS[kind] = (key, model)
        logger.info("Redux: loaded %s %s", KINDS[kind], name)
        return model
