"""Vision encoders (CLIP, SigLIP, the Redux projector) on the host: finding their files, loading them once, running
them inside the host's model management, and remembering encodings for one job.

* Files: each technique's own folder under models/imgcond, then the folders where users already keep encoders
  (models/clip_vision, and models/ControlNetPreprocessor with its subfolders). From those shared folders only files
  whose header is a vision encoder of the wanted kind are offered. Choices are file names; where two folders hold the
  same name, the choice names the folder too (`name.safetensors [clip_vision]`); a bare name means the first.
* Memory: a loaded module is wrapped in the host's `ModelPatcher` and every use goes through
  `memory_management.load_models_gpu`, so the host offloads it (or other models to make room for it) like its own
  models. Where the host has no model management (no Forge) modules stay on the CPU in float32.
* Encodings: `job_encodings(p)` is a bounded cache owned by one processing object (hires pass and batch count
  included), keyed by image content, encoder file and preprocessing; `end_job(p)` drops it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lib_imgcond.host import capabilities as webui
from lib_imgcond.host import forge
from lib_imgcond.vision import config as vision_cfg
from lib_imgcond.vision import transformer as vs

EXTENSIONS = (".safetensors",)
SHARED_FOLDERS = (("clip_vision", False), ("ControlNetPreprocessor", True))  # (folder under models/, recursive)
MAX_DEPTH = 3  # subfolder levels searched in a recursive folder
MAX_ENCODINGS = 64  # encodings remembered per job
_STATE_KEY = "encodings"
_KINDS_LOCK = threading.Lock()
_KINDS: dict[tuple, str | None] = {}  # (path, mtime, size) → "clip" | "siglip" | None (not a vision encoder)


# --- files ------------------------------------------------------------------------------------------------------------
def models_root() -> str:
    """The WebUI's models folder."""
    return os.path.dirname(forge.models_dir("imgcond"))


def shared_dirs() -> list[tuple[str, bool]]:
    """(folder, recursive) of the shared encoder folders (not created when missing)."""
    root = models_root()
    return [(os.path.join(root, name), recursive) for name, recursive in SHARED_FOLDERS]


def file_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.abspath(path), st.st_mtime_ns, st.st_size)


def vision_kind(path: str) -> str | None:
    """'clip' or 'siglip' when the file's header is a vision encoder in Hugging Face layout, else None (cached)."""
    try:
        key = file_key(path)
    except OSError:
        return None
    with _KINDS_LOCK:
        if key in _KINDS:
            return _KINDS[key]
    try:
        kind = vision_cfg.detect_config(vision_cfg.read_shapes(path), os.path.basename(path)).kind
    except Exception:  # not safetensors, not a vision encoder, unreadable
        kind = None
    with _KINDS_LOCK:
        _KINDS[key] = kind
    return kind


def _walk(folder: str, recursive: bool) -> list[str]:
    """The .safetensors files in `folder` (then its subfolders, MAX_DEPTH levels deep), in a stable order."""
    return _walk_limited(folder, MAX_DEPTH if recursive else 0)


def _walk_limited(folder: str, levels: int) -> list[str]:
    out: list[str] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return out
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.lower().endswith(EXTENSIONS):
            out.append(entry.path)
    if levels > 0:
        for entry in entries:
            if entry.is_dir() and not entry.name.startswith("."):
                out += _walk_limited(entry.path, levels - 1)
    return out


@dataclass(frozen=True)
class Entry:
    label: str  # what the dropdown shows and the infotext records
    path: str
    name: str  # the bare file name


def _folder_label(path: str) -> str:
    folder = os.path.dirname(path)
    root = os.path.abspath(models_root())
    rel = os.path.relpath(os.path.abspath(folder), root)
    return folder if rel.startswith("..") else rel.replace(os.sep, "/")


def catalogue(own_dirs: list[str], kind: str | None) -> list[Entry]:
    """Encoder files: every .safetensors in `own_dirs` (in order), then the shared folders' files whose header is a
    vision encoder of `kind` ('clip' / 'siglip'; None: no shared folders). The same file found twice is listed once;
    a name found in two folders gets its folder in the label."""
    paths: list[str] = []
    for folder in own_dirs:
        paths += _walk(folder, False)
    if kind is not None:
        for folder, recursive in shared_dirs():
            paths += [p for p in _walk(folder, recursive) if vision_kind(p) == kind]
    seen, unique = set(), []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    names = [os.path.basename(p) for p in unique]
    out = []
    for path, name in zip(unique, names, strict=True):
        label = name if names.count(name) == 1 else f"{name} [{_folder_label(path)}]"
        out.append(Entry(label, path, name))
    return out


def find(entries: list[Entry], choice: str) -> Entry | None:
    """The entry for a dropdown choice: its label, or a bare file name (with or without .safetensors; the first)."""
    choice = (choice or "").strip()
    for entry in entries:
        if entry.label == choice:
            return entry
    for entry in entries:
        if choice in (entry.name, os.path.splitext(entry.name)[0]):
            return entry
    return None


def describe_dirs(own_dirs: list[str], kind: str | None) -> str:
    shared = [d for d, _ in shared_dirs()] if kind is not None else []
    return " or ".join([*own_dirs, *shared])


# --- placement and memory management ----------------------------------------------------------------------------------
def _mm():
    from backend import memory_management

    return memory_management


def placement() -> tuple[torch.device, torch.device, torch.dtype]:
    """(load device, offload device, dtype) for an encoder: the host's text-encoder devices, fp16 where it allows on
    CUDA; without the host's model management the CPU in float32."""
    cpu = torch.device("cpu")
    if not webui.capabilities().model_management:
        return cpu, cpu, torch.float32
    mm = _mm()
    load, offload = torch.device(mm.text_encoder_device()), torch.device(mm.text_encoder_offload_device())
    fp16 = load.type == "cuda" and mm.should_use_fp16(load, prioritize_performance=False)
    return load, offload, torch.float16 if fp16 else torch.float32


class Managed:
    """A loaded encoder module inside the host's model management: `use()` asks the host to load it (offloading
    others when memory is short) and returns the device to feed it on. `config` and `encode` mirror the module."""

    def __init__(self, module: torch.nn.Module, load_device: torch.device, offload_device: torch.device, key=()):
        self.module = module
        self.key = key  # identifies the weights (file, mtime, size, dtype) in encoding-cache keys
        self.load_device = load_device
        self.offload_device = offload_device
        self.patcher = None
        if webui.capabilities().model_management:
            from backend.patcher.base import ModelPatcher

            self.patcher = ModelPatcher(module, load_device=load_device, offload_device=offload_device)

    @property
    def config(self):
        return self.module.config

    def use(self) -> torch.device:
        return use_together(self)

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> Any:
        device = self.use()
        return self.module(*(x.to(device) for x in inputs))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> vision_cfg.VisionOutput:
        """Preprocess (B,3,H,W) images in [0,1] and run the vision encoder on its load device."""
        return self(vs.preprocess(images, self.module.config))


def use_together(*models: Managed) -> torch.device:
    """Have the host load `models` at once (so one does not offload the other); the device to feed them on."""
    patchers = [m.patcher for m in models if m.patcher is not None]
    if patchers:
        if webui.capabilities().full_load_flag:  # plain torch layers cannot run partially loaded
            _mm().load_models_gpu(patchers, force_full_load=True)
        else:
            _mm().load_models_gpu(patchers)
    return models[0].load_device


class ModelCache:
    """Loaded encoders by key, at most `size` of them (the oldest goes first); thread-safe."""

    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict[Any, tuple[tuple, Managed]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, slot: Any, key: tuple, build: Callable[[], Managed]) -> Managed:
        with self.lock:
            hit = self.items.get(slot)
            if hit is not None and hit[0] == key:
                self.items.move_to_end(slot)
                return hit[1]
            self.items.pop(slot, None)
            while len(self.items) >= self.size:
                self.items.popitem(last=False)
            managed = build()
            self.items[slot] = (key, managed)
            return managed

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


# --- encodings of one job ---------------------------------------------------------------------------------------------
def content_hash(value: Any) -> str:
    """A digest of an image's content: a tensor's dtype, shape and bytes, or a PIL image's mode, size and pixels."""
    h = hashlib.sha1()
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(f"{value.mode}{value.size}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


class Encodings:
    """Encodings remembered for one job: key → tensor, at most MAX_ENCODINGS (the oldest goes first)."""

    def __init__(self, owner: Any):
        self.owner = owner
        self.items: OrderedDict[tuple, Any] = OrderedDict()
        self.computed = 0
        self.reused = 0

    def get(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            self.reused += 1
            return self.items[key]
        value = compute()
        self.computed += 1
        self.items[key] = value
        while len(self.items) > MAX_ENCODINGS:
            self.items.popitem(last=False)
        return value


def job_encodings(p: Any) -> Encodings:
    """The encodings cache of the job `p` (a copy of `p`, as X/Y/Z makes per cell, gets a fresh one)."""
    cache = forge.job_state(p, _STATE_KEY, lambda: Encodings(p))
    if cache.owner is not p:
        forge.drop_job_state(p, _STATE_KEY)
        cache = forge.job_state(p, _STATE_KEY, lambda: Encodings(p))
    return cache


def end_job(p: Any) -> None:
    """Forget the job's encodings (call from `postprocess`)."""
    forge.drop_job_state(p, _STATE_KEY)
