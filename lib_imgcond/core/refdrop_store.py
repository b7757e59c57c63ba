"""RefDrop K/V store: CPU-RAM reference, .safetensors file format, budget and compatibility checks, prefetcher."""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from safetensors import safe_open

from lib_imgcond.core.errors import ArgumentError, ImgcondError
from lib_imgcond.core.refdrop import _lookup, check_family, family_label, format_layers, layer_table

log = logging.getLogger(__name__)

FORMAT = "imgcond-refdrop"
FORMAT_VERSION = 1
PASSES = ("first", "hires", "first_uncond", "hires_uncond")
SOURCES = ("generation", "image")

_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}

Layer = tuple[str, int, int]


class RefKey(NamedTuple):
    """Address of one recorded K/V pair."""

    pass_name: str
    step: int
    group: str
    block_id: int
    block_index: int

    @property
    def layer(self) -> Layer:
        return (self.group, self.block_id, self.block_index)

    def tensor_name(self, kv: str) -> str:
        return f"{self.pass_name}/{self.step}/{self.group}/{self.block_id}/{self.block_index}/{kv}"


def _layer(item: Sequence[Any]) -> Layer:
    return (str(item[0]), int(item[1]), int(item[2]))


def format_bytes(n: int) -> str:
    """Human-readable size in binary units."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


_pin_failed = False


def _cpu_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Empty CPU tensor, pinned when CUDA is available (falls back to pageable memory once pinning fails)."""
    global _pin_failed
    if not _pin_failed and torch.cuda.is_available():
        try:
            return torch.empty(tuple(shape), dtype=dtype, pin_memory=True)
        except RuntimeError as e:
            _pin_failed = True
            log.warning("RefDrop: could not pin host memory (%s); using pageable memory from now on", e)
    return torch.empty(tuple(shape), dtype=dtype)


def trim_host_memory() -> None:
    """Give freed host memory back after dropping a reference: collect cycles, release torch's cached pinned blocks
    (CUDA) and ask glibc to return free heap pages to the OS (its heap keeps them otherwise, and RSS only grows)."""
    import contextlib
    import ctypes
    import gc
    import sys

    gc.collect()
    if torch.cuda.is_available():
        empty = getattr(torch._C, "_host_emptyCache", None)
        if empty is not None:
            empty()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class HostArena:
    """Carves a reference's CPU buffers out of large pinned slabs.

    Pinning host memory is slow (one `cudaHostAlloc` per tensor took 1.6–2.7 ms on an H200 host, 140 times per SDXL
    step) and torch rounds every pinned allocation up to a power of two. Slabs of a fixed power-of-two size make both
    costs vanish: a handful of allocations per recording, no rounding waste, and torch's host cache hands the same
    slabs to the next recording once a reference is dropped. Without CUDA, tensors are plain allocations.
    """

    SLAB = 256 << 20
    ALIGN = 512

    def __init__(self):
        self._slab: torch.Tensor | None = None
        self._used = 0

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        if _pin_failed or not torch.cuda.is_available():
            return _cpu_tensor(shape, dtype)
        numel = 1
        for n in shape:
            numel *= int(n)
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if nbytes > self.SLAB // 4:
            return _cpu_tensor(shape, dtype)  # large tensors get their own block
        start = -(-self._used // self.ALIGN) * self.ALIGN
        if self._slab is None or start + nbytes > self.SLAB:
            slab = _cpu_tensor((self.SLAB,), torch.uint8)
            if not slab.is_pinned():
                return _cpu_tensor(shape, dtype)
            self._slab, start = slab, 0
        self._used = start + nbytes
        return self._slab[start : start + nbytes].view(dtype).view(tuple(shape))


def _to_host(t: torch.Tensor, arena: HostArena | None = None) -> torch.Tensor:
    """A CPU copy owning its memory (pinned when CUDA is available)."""
    out = arena.empty(t.shape, t.dtype) if arena is not None else _cpu_tensor(t.shape, t.dtype)
    out.copy_(t)
    return out


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


class Reference:
    """Recorded self-attention K/V of one reference image, held in CPU RAM."""

    def __init__(self, name: str, family: str, meta: Mapping[str, Any] | None = None, *, store_fp16: bool = False):
        self.name = name
        self.family = check_family(family)
        self.store_fp16 = store_fp16
        self.meta: dict[str, Any] = {
            "steps": {},
            "width": 0,
            "height": 0,
            "dtype": "",
            "layers": [],
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "source": "generation",
        }
        self.meta.update(meta or {})
        self.meta["steps"] = dict(self.meta["steps"])
        if self.meta["source"] not in SOURCES:
            raise ArgumentError("source", self.meta["source"], " or ".join(SOURCES))
        self._kv: dict[RefKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lazy: list[tuple[torch.Tensor, list]] = []  # put_many blocks whose per-key views are not made yet
        self._seen_steps: dict[str, int] = {}
        self._channels: dict[Layer, int] = {}
        self._pending: list[Any] = []
        self._unsynced = False  # CUDA copies queued by put(..., record_event=False)
        self._arena = HostArena()

    def __deepcopy__(self, memo: dict) -> Reference:
        return self  # Forge deep-copies model_options on clone(); a store must stay shared

    def __repr__(self) -> str:
        return f"Reference({self.name!r}, {self.family}, {len(self)} keys, {format_bytes(self.nbytes)})"

    def __len__(self) -> int:
        return len(self._kv)

    def __contains__(self, key: object) -> bool:
        return key in self._kv

    def __iter__(self) -> Iterator[RefKey]:
        return iter(self._kv)

    def keys(self) -> Iterator[RefKey]:
        return iter(self._kv)

    def _check_key(self, key: Sequence[Any]) -> RefKey:
        key = RefKey(str(key[0]), int(key[1]), str(key[2]), int(key[3]), int(key[4]))
        if key.pass_name not in PASSES:
            raise ArgumentError("pass_name", key.pass_name, " or ".join(PASSES))
        if key.step < 0 or key.layer not in _lookup(self.family):
            raise ImgcondError(f"{key} does not address a transformer block of {self.family}")
        return key

    def _storage_dtype(self, src: torch.dtype) -> torch.dtype:
        return torch.float16 if self.store_fp16 and src == torch.float32 else src

    def put(
        self, key: Sequence[Any], k: torch.Tensor, v: torch.Tensor, *, trusted: bool = False, record_event: bool = True
    ) -> None:
        """Copy K and V (any device) into CPU buffers; CUDA copies are asynchronous until finalize().

        `trusted=True` skips the key validation (the caller builds keys from the layer table); `record_event=False`
        skips the per-put CUDA event, and finalize() then synchronises the device instead (the recording hot path).
        """
        if not trusted:
            key = self._check_key(key)
            if k.shape != v.shape or k.dim() != 3:
                raise ImgcondError(
                    f"RefDrop K and V must both be (batch, tokens, channels); got {k.shape} and {v.shape}"
                )
        elif not isinstance(key, RefKey):
            key = RefKey(*key)
        with torch.inference_mode(False), torch.no_grad():
            bufs = self._kv.get(key)
            if bufs is None or bufs[0].shape != k.shape:
                dtype = self._storage_dtype(k.dtype)
                bufs = (self._arena.empty(k.shape, dtype), self._arena.empty(v.shape, dtype))
                self._kv[key] = bufs
            for buf, src in zip(bufs, (k, v), strict=True):
                if src.dtype != buf.dtype:
                    src = src.to(buf.dtype)  # convert on the source device: less to transfer
                buf.copy_(src, non_blocking=src.is_cuda)
        if k.is_cuda:
            if record_event:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(k.device))
                self._pending.append(event)
            else:
                self._unsynced = True
        if key.step >= self._seen_steps.get(key.pass_name, 0):
            self._seen_steps[key.pass_name] = key.step + 1
        self._channels[key.layer] = k.shape[-1]

    def put_many(self, items: Sequence[tuple[Sequence[Any], torch.Tensor, torch.Tensor]]) -> int:
        """Store many (key, k, v) at once with one gather and one copy into one host block; returns the bytes added.

        Keys are trusted (the caller builds them from the layer table). On CUDA the copy is asynchronous on the
        current stream: the caller keeps the sources alive for it (e.g. `record_stream`), finalize() waits for it.
        """
        if not items:
            return 0
        src = items[0][1]
        dtype = self._storage_dtype(src.dtype)
        sizes = [k.numel() for _, k, _ in items]
        total = 2 * sum(sizes)
        with torch.inference_mode(False), torch.no_grad():
            flat = torch.cat([t.reshape(-1) for _, k, v in items for t in (k, v)])
            if flat.dtype != dtype:
                flat = flat.to(dtype)
            block = self._arena.empty((total,), dtype)
            block.copy_(flat, non_blocking=flat.is_cuda)
        entries = []
        offset = 0
        for (key, k, _v), n in zip(items, sizes, strict=True):
            key = key if isinstance(key, RefKey) else RefKey(*key)
            entries.append((key, offset, n, k.shape))
            offset += 2 * n
            self._kv[key] = None  # views are made on first read (see _materialize): cheap in the sampling loop
            if key.step >= self._seen_steps.get(key.pass_name, 0):
                self._seen_steps[key.pass_name] = key.step + 1
            self._channels[key.layer] = k.shape[-1]
        self._lazy.append((block, entries))
        if flat.is_cuda:
            self._unsynced = True
        return total * block.element_size()

    def _materialize(self) -> None:
        for block, entries in self._lazy:
            for key, offset, n, shape in entries:
                if self._kv.get(key, 0) is None:
                    self._kv[key] = (
                        block[offset : offset + n].view(shape),
                        block[offset + n : offset + 2 * n].view(shape),
                    )
        self._lazy.clear()

    def finalize(self) -> None:
        """Wait for pending device→host copies and refresh the derived metadata."""
        self._materialize()
        for event in self._pending:
            event.synchronize()
        self._pending.clear()
        if self._unsynced:
            torch.cuda.synchronize()
            self._unsynced = False
        if self._kv:
            first = next(iter(self._kv.values()))[0]
            self.meta["dtype"] = str(first.dtype).replace("torch.", "")
        pos = _positions(self.family)
        self.meta["layers"] = [list(x) for x in sorted(self.layers(), key=pos.__getitem__)]

    def get(
        self, key: Sequence[Any], device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) for ``key``, moved/cast when device or dtype is given."""
        if self._pending or self._unsynced:
            self.finalize()
        if self._lazy:
            self._materialize()
        pair = self._kv.get(key)  # type: ignore[arg-type]
        if pair is None:
            raise ImgcondError(f"reference '{self.name}' has no K/V for {tuple(key)}; record it again")
        if device is None and dtype is None:
            return pair
        return pair[0].to(device=device, dtype=dtype), pair[1].to(device=device, dtype=dtype)

    def has_pass(self, pass_name: str) -> bool:
        return pass_name in self._seen_steps

    def steps(self, pass_name: str) -> int:
        """Sampling steps of that pass in the recording run (meta['steps'], else inferred from the keys)."""
        return int(self.meta["steps"].get(pass_name) or self._seen_steps.get(pass_name, 0))

    def layers(self, pass_name: str | None = None) -> set[Layer]:
        """Recorded (group, block_id, block_index) triples, optionally for one pass only."""
        return {k.layer for k in self._kv if pass_name is None or k.pass_name == pass_name}

    def channels(self, layer: Sequence[Any]) -> int | None:
        return self._channels.get(_layer(layer))

    @property
    def nbytes(self) -> int:
        self._materialize()
        return sum(t.numel() * t.element_size() for pair in self._kv.values() for t in pair)


def _positions(family: str) -> dict[Layer, int]:
    return {(lid.group, lid.block_id, lid.block_index): i for i, lid in enumerate(layer_table(family))}


def _key_order(ref: Reference) -> list[RefKey]:
    pos = _positions(ref.family)
    return sorted(ref.keys(), key=lambda k: (PASSES.index(k.pass_name), k.step, pos[k.layer]))


# ---------------------------------------------------------------------------------------------
# Budget
# ---------------------------------------------------------------------------------------------


def estimate_bytes(
    token_counts_and_channels: Iterable[tuple[int, int]], steps: int, batch_rows: int, bytes_per_el: int
) -> int:
    """Bytes of K+V for the given (tokens, channels) layers over ``steps`` steps and ``batch_rows`` rows."""
    per_call = sum(int(t) * int(c) for t, c in token_counts_and_channels)
    return 2 * per_call * int(steps) * int(batch_rows) * int(bytes_per_el)


def check_budget(needed_bytes: int, budget_bytes: int) -> None:
    """Raise if a reference would exceed the RAM budget (0 = unlimited)."""
    if budget_bytes > 0 and needed_bytes > budget_bytes:
        raise ImgcondError(
            f"this reference needs {format_bytes(needed_bytes)} but the RAM budget is {format_bytes(budget_bytes)}; "
            "raise it in Settings → ImgCond or select fewer layers/steps"
        )


# ---------------------------------------------------------------------------------------------
# File format
# ---------------------------------------------------------------------------------------------


def _header_meta(ref: Reference, keys: list[RefKey]) -> dict[str, str]:
    m = ref.meta
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "storage": "kv",  # the other kind, "trajectory", is refdrop_trajectory's
        "name": str(ref.name),
        "family": ref.family,
        "steps": json.dumps({p: ref.steps(p) for p in PASSES if ref.has_pass(p)}),
        "width": str(int(m.get("width") or 0)),
        "height": str(int(m.get("height") or 0)),
        "dtype": str(m.get("dtype", "")),
        "layer_count": str(len(m["layers"])),
        "layers": json.dumps(m["layers"]),
        "created": str(m.get("created", "")),
        "source": str(m.get("source", "generation")),
        "keys": json.dumps([list(k) for k in keys]),
        "trace": json.dumps(m.get("trace", {})),
    }


def _write_safetensors(path: str, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """Stream tensors into a .safetensors file without building the whole file in memory."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors:
        if t.dtype not in _ST_DTYPES:
            raise ImgcondError(f"RefDrop cannot save tensors of dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in tensors:
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def save_reference(ref: Reference, path: str | os.PathLike) -> None:
    """Write ``ref`` as one .safetensors file (atomically: temp file + os.replace)."""
    ref.finalize()
    if not len(ref):
        raise ImgcondError(f"reference '{ref.name}' is empty: nothing was recorded, so there is nothing to save")
    path = os.fspath(path)
    keys = _key_order(ref)
    tensors = []
    for key in keys:
        k, v = ref.get(key)
        tensors += [(key.tensor_name("k"), k), (key.tensor_name("v"), v)]
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        _write_safetensors(tmp, tensors, _header_meta(ref, keys))
        os.replace(tmp, path)
    except OSError as e:
        msg = f"could not write RefDrop reference {path}: {e}; check free disk space and permissions"
        raise ImgcondError(msg) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _corrupt(path: str, why: object) -> ImgcondError:
    return ImgcondError(f"RefDrop reference {path} is truncated or corrupt ({why}); record it again")


def _check_header(path: str, meta: Mapping[str, str] | None) -> dict[str, Any]:
    """Validate the metadata block and decode its JSON/int fields."""
    if not meta or meta.get("format") != FORMAT:
        raise ImgcondError(f"{path} is not an imgcond RefDrop reference (no '{FORMAT}' metadata)")
    try:
        version = int(meta.get("format_version", ""))
        info = {
            "name": meta.get("name") or os.path.splitext(os.path.basename(path))[0],
            "family": meta.get("family", ""),
            "steps": {str(p): int(n) for p, n in json.loads(meta.get("steps", "{}")).items()},
            "width": int(meta.get("width", 0)),
            "height": int(meta.get("height", 0)),
            "dtype": meta.get("dtype", ""),
            "layers": json.loads(meta.get("layers", "[]")),
            "created": meta.get("created", ""),
            "source": meta.get("source", "generation"),
            "format_version": version,
            "keys": json.loads(meta.get("keys", "[]")),
            "trace": json.loads(meta.get("trace", "{}")),
        }
    except (ValueError, TypeError, AttributeError) as e:
        raise _corrupt(path, f"bad metadata: {e}") from e
    if version < 1 or version > FORMAT_VERSION:
        raise ImgcondError(
            f"{path} uses RefDrop file format {version}, but this imgcond reads format {FORMAT_VERSION}; "
            "update sd-webui-imgcond or record the reference again"
        )
    check_family(info["family"])
    return info


def _open_error(path: str, e: Exception) -> ImgcondError:
    if not os.path.exists(path):
        return ImgcondError(f"RefDrop reference {path} does not exist; record it first or pick another one")
    return _corrupt(path, e)


def load_reference(path: str | os.PathLike) -> Reference:
    """Read and validate a reference file; tensors land in CPU memory (pinned when CUDA is available)."""
    path = os.fspath(path)
    arena = HostArena()
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            info = _check_header(path, f.metadata())
            keys = [RefKey(str(a), int(b), str(c), int(d), int(e)) for a, b, c, d, e in info["keys"]]
            names = set(f.keys())
            pairs = []
            for key in keys:
                kn, vn = key.tensor_name("k"), key.tensor_name("v")
                if kn not in names or vn not in names:
                    raise _corrupt(path, f"K/V for {kn[:-2]} missing")
                pairs.append((key, _to_host(f.get_tensor(kn), arena), _to_host(f.get_tensor(vn), arena)))
    except ImgcondError:
        raise
    except Exception as e:
        raise _open_error(path, e) from e
    fields = ("steps", "width", "height", "dtype", "layers", "created", "source", "format_version", "trace")
    meta = {k: info[k] for k in fields}
    ref = Reference(info["name"], info["family"], meta)
    ref._arena = arena
    for key, k, v in pairs:
        if k.shape != v.shape or k.dim() != 3:
            shapes = f"{tuple(k.shape)} and {tuple(v.shape)}"
            raise _corrupt(path, f"K and V of {key.tensor_name('')[:-1]} have shapes {shapes}")
        key = ref._check_key(key)
        ref._kv[key] = (k, v)
        ref._seen_steps[key.pass_name] = max(ref._seen_steps.get(key.pass_name, 0), key.step + 1)
        ref._channels[key.layer] = k.shape[-1]
    return ref


def reference_info(path: str | os.PathLike) -> dict[str, Any]:
    """Header-only summary for listings: name, family, size on disk, steps, width×height."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata()
        info = _check_header(path, meta)
        size = os.path.getsize(path)
    except ImgcondError:
        raise
    except Exception as e:
        raise _open_error(path, e) from e
    del info["keys"]
    info.update(
        path=path,
        size_bytes=size,
        size=format_bytes(size),
        resolution=f"{info['width']}×{info['height']}",
        layer_count=len(info["layers"]),
    )
    return info


# ---------------------------------------------------------------------------------------------
# Compatibility
# ---------------------------------------------------------------------------------------------


def check_compatible(
    ref: Reference, family: str, layers_needed: Iterable[Sequence[Any]], passes_needed: Iterable[str]
) -> None:
    """Raise ImgcondError when ``ref`` cannot serve this model, these layers and these passes."""
    if ref.family != family:
        recorded, loaded = family_label(ref.family), family_label(family)
        raise ImgcondError(
            f"reference '{ref.name}' was recorded on {recorded} but the loaded model is {loaded}; "
            f"load a {recorded} model or record the reference again"
        )
    needed = {_layer(x) for x in layers_needed}
    for pass_name in sorted(set(passes_needed), key=lambda p: PASSES.index(p) if p in PASSES else 99):
        if pass_name not in PASSES:
            raise ArgumentError("pass", pass_name, " or ".join(PASSES))
        if not ref.has_pass(pass_name):
            if pass_name == "hires":
                raise ImgcondError(
                    f"reference '{ref.name}' has no hires-pass K/V: record it with hires fix enabled "
                    "or turn off 'Use in hires pass'"
                )
            raise ImgcondError(f"reference '{ref.name}' has no first-pass K/V: record it again")
        recorded = ref.layers(pass_name)
        missing = needed - recorded
        if missing:
            where = " for the hires pass" if pass_name == "hires" else ""
            raise ImgcondError(
                f"layers {format_layers(missing, family)} were not recorded in '{ref.name}'{where}; "
                f"select only {format_layers(recorded, family)} or record it again with these layers"
            )


def check_shapes(ref: Reference, layer: Sequence[Any], channels: int) -> None:
    """Raise when the recorded K/V width at ``layer`` differs from the model's (another architecture)."""
    recorded = ref.channels(layer)
    if recorded is not None and recorded != channels:
        lid = _lookup(ref.family).get(_layer(layer))
        where = f"{lid.group}:{lid.index}" if lid else str(tuple(layer))
        raise ImgcondError(
            f"reference '{ref.name}' has {recorded} channels at {where} but the loaded model has {channels}: "
            "it was recorded with a different model architecture; record it again with this model"
        )


# ---------------------------------------------------------------------------------------------
# Prefetcher
# ---------------------------------------------------------------------------------------------


class Prefetcher:
    """Moves a reference's K/V to the sampling device ahead of use, keeping about two steps resident."""

    def __init__(self, ref: Reference, device: torch.device | str, dtype: torch.dtype):
        self.ref = ref
        self.device = torch.device(device)
        self.dtype = dtype
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        self._max_steps = 2 if self._cuda else 1
        # (pass, step) -> key -> (k, v, ready event or None); most recently used last
        self._steps: OrderedDict[tuple[str, int], dict[RefKey, tuple[torch.Tensor, torch.Tensor, Any]]] = OrderedDict()

    def __deepcopy__(self, memo: dict) -> Prefetcher:
        return self

    def _bucket(self, key: RefKey) -> dict[RefKey, tuple[torch.Tensor, torch.Tensor, Any]]:
        step = (key.pass_name, key.step)
        if step not in self._steps:
            self._steps[step] = {}
            while len(self._steps) > self._max_steps:
                self._steps.popitem(last=False)
        self._steps.move_to_end(step)
        return self._steps[step]

    def _move(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, non_blocking=t.is_pinned())
        return t if t.dtype == self.dtype else t.to(self.dtype)

    def fetch(self, step_keys: Iterable[Sequence[Any]]) -> None:
        """Start copying these keys to the device on a side stream (no-op on CPU)."""
        if not self._cuda:
            return
        with torch.cuda.stream(self._stream):
            for key in step_keys:
                key = RefKey(*key)
                bucket = self._bucket(key)
                if key in bucket or key not in self.ref:
                    continue
                k, v = self.ref.get(key)
                k, v = self._move(k), self._move(v)
                event = torch.cuda.Event()
                event.record(self._stream)
                bucket[key] = (k, v, event)

    def get(self, key: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Device (k, v) for ``key``: prefetched if available, else copied now."""
        key = RefKey(*key)
        bucket = self._bucket(key)
        hit = bucket.get(key)
        if hit is None:
            k, v = self.ref.get(key)
            hit = (self._move(k), self._move(v), None)
            bucket[key] = hit
        k, v, event = hit
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            k.record_stream(stream)
            v.record_stream(stream)
            bucket[key] = (k, v, None)
        return k, v

    def clear(self) -> None:
        """Drop every device copy."""
        self._steps.clear()
