"""Flux Redux on Forge: the model files (SigLIP encoder, Redux projector), found in the models folders and loaded once.

SigLIP files come from models/imgcond/siglip and the settings' folders, then models/clip_vision and
models/ControlNetPreprocessor (SigLIP encoders only); Redux files from models/imgcond/redux and the settings' folders.
Automatic choice ('' as the name) takes the first file whose header fits the slot, so a stray file in the folder does
not shadow the right one. Loaded models live in the host's model management (`encoders.Managed`), one per kind.
"""

from __future__ import annotations

import os

import torch

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.common.log import logger
from lib_imgcond.host import forge
from lib_imgcond.redux import projector
from lib_imgcond.vision import config as vision_cfg
from lib_imgcond.vision import forge_encoders as encoders
from lib_imgcond.vision import transformer as vs

KINDS = {"siglip": "SigLIP vision model", "redux": "Redux model"}
SHARED_KIND = {"siglip": "siglip", "redux": None}  # which encoders of the shared folders a kind offers
EXTRA_DIRS_OPTION = "imgcond_redux_extra_dirs"
_MODELS = encoders.ModelCache(len(KINDS))  # kind → the loaded model


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


def entries(kind: str) -> list[encoders.Entry]:
    return encoders.catalogue(model_dirs(kind), SHARED_KIND[kind])


def list_files(kind: str) -> list[str]:
    """The dropdown choices for `kind`: .safetensors files in folder order then alphabetically, each file once (a
    name found in two folders shows its folder)."""
    return [e.label for e in entries(kind)]


def choice_label(kind: str, path: str) -> str:
    """How the infotext names the file at `path` (its dropdown choice)."""
    real = os.path.realpath(path)
    return next((e.label for e in entries(kind) if os.path.realpath(e.path) == real), os.path.basename(path))


def resolve(kind: str, name: str) -> str:
    """The path of model file `name` ('' = the first one that fits); ImgcondError naming the folders otherwise."""
    label, found = KINDS[kind], entries(kind)
    where = encoders.describe_dirs(model_dirs(kind), SHARED_KIND[kind])
    name = (name or "").strip()
    if not name:
        if not found:
            wanted = "sigclip_vision_patch14_384.safetensors" if kind == "siglip" else "flux1-redux-dev.safetensors"
            raise ImgcondError(f"Redux needs a {label}: no .safetensors file in {where}. Put {wanted} there.")
        return _first_valid(kind, [e.path for e in found])
    entry = encoders.find(found, name)
    if entry is not None:
        return entry.path
    if not name.lower().endswith(".safetensors"):
        raise ImgcondError(
            f"Redux: the {label} '{name}' is not a .safetensors file (only those are loaded from {where})"
        )
    raise ImgcondError(f"Redux: the {label} '{name}' was not found in {where}")


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


_file_key = encoders.file_key


def compute_device_dtype() -> tuple[torch.device, torch.dtype]:
    """(device the encoders run on, their dtype): the host's choice for encoders (`encoders.placement`)."""
    load, _offload, dtype = encoders.placement()
    return load, dtype


def _shapes(path: str) -> dict:
    try:
        return vision_cfg.read_shapes(path)
    except Exception as e:  # safetensors' own errors: truncated file, not a safetensors file, ...
        raise ImgcondError(f"Redux: {os.path.basename(path)} cannot be read as a .safetensors file ({e})") from None


def vision_config(path: str) -> vision_cfg.VisionConfig:
    """Architecture of a SigLIP file from its header; a clear error for any other file (CLIP, T5, ...)."""
    name = os.path.basename(path)
    try:
        cfg = vision_cfg.detect_config(_shapes(path), source=name)
    except ImgcondError as e:
        raise ImgcondError(f"Redux SigLIP vision model: {e}") from None
    vision_cfg.expect_kind(cfg, {"siglip"}, "Redux SigLIP vision model")
    return cfg


def _check_redux_file(path: str) -> None:
    keys = _shapes(path)
    if "redux_down.weight" not in keys:
        raise ImgcondError(
            f"Redux model: {os.path.basename(path)} looks like {vision_cfg.describe_keys(keys)}, expected the Flux "
            "Redux style model (flux1-redux-dev.safetensors)"
        )


def weights_key(path: str, dtype: torch.dtype) -> tuple:
    """What identifies a loaded model's weights: the file (path, mtime, size), the dtype and where it is offloaded."""
    return (*_file_key(path), str(dtype), encoders.placement()[1].type)


def load_model(kind: str, path: str, dtype: torch.dtype) -> encoders.Managed:
    """The loaded SigLIP / Redux model inside the host's model management (cached: one per kind, reloaded when the
    file or dtype changes); `.module` is the torch module."""
    from safetensors.torch import load_file

    load, offload, _dtype = encoders.placement()
    key = weights_key(path, dtype)

    def build() -> encoders.Managed:
        name = os.path.basename(path)
        if kind == "siglip":
            vision_config(path)
            module = vs.load_vision_model(load_file(path), dtype=dtype, device=offload, source=name)
        else:
            _check_redux_file(path)
            module = projector.load_redux(load_file(path), dtype=dtype, device=offload, source=name)
        logger.info("Redux: loaded %s %s", KINDS[kind], name)
        return encoders.Managed(module, load, offload, key)

    return _MODELS.get(kind, key, build)
