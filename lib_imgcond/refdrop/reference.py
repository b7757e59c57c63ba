"""RefDrop's in-RAM reference: the recorded K/V of one image, addressed by (pass, step, layer)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.memory import host_blocks, host_staging
from lib_imgcond.memory.arena import HostArena, format_bytes
from lib_imgcond.refdrop import precision as prec
from lib_imgcond.refdrop.layers import _lookup, check_family, layer_table

FORMAT_VERSION = 2  # the newest file format this code reads (2: fp8 K/V with their scales)
PASSES = ("first", "hires", "first_uncond", "hires_uncond")
SOURCES = ("generation", "image")

Layer = tuple[str, int, int]


def base_meta(format_version: int, meta: Mapping[str, Any] | None = None, **defaults: Any) -> dict[str, Any]:
    """A new reference's metadata (of either storage kind): the common defaults, then `defaults`, then `meta`."""
    out: dict[str, Any] = {
        "steps": {},
        "width": 0,
        "height": 0,
        "dtype": "",
        "layers": [],
        "format_version": format_version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source": "generation",
        **defaults,
    }
    out.update(meta or {})
    return out


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


class Reference:
    """Recorded self-attention K/V of one reference image, held in CPU RAM, or with `keep_on` a device: then what
    `put_many` gathers on that device stays there (a recording kept in GPU memory; see `fits_on_device`)."""

    def __init__(
        self,
        name: str,
        family: str,
        meta: Mapping[str, Any] | None = None,
        *,
        store_fp16: bool = False,
        precision: str | None = None,
        keep_on: torch.device | str | None = None,
    ):
        self.name = name
        self.device = None if keep_on is None else torch.device(keep_on)
        self.family = check_family(family)
        self.precision = prec.check_precision(precision) if precision else prec.FP16 if store_fp16 else prec.AS_COMPUTED
        self.meta = base_meta(FORMAT_VERSION, meta)
        self.meta["steps"] = dict(self.meta["steps"])
        if self.meta["source"] not in SOURCES:
            raise ArgumentError("source", self.meta["source"], " or ".join(SOURCES))
        self._kv: dict[RefKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scales: dict[RefKey, torch.Tensor] = {}  # fp8: (2,) fp32 host tensor, the K and V scales
        self._lazy: list[tuple[torch.Tensor, list]] = []  # put_many blocks whose per-key views are not made yet
        self._seen_steps: dict[str, int] = {}
        self._channels: dict[Layer, int] = {}
        self._pending: list[Any] = []
        self._unsynced = False  # CUDA copies queued by put(..., record_event=False)
        self._staged = False  # copies queued on the staging ring by put_many
        self._mappings: list = []  # put_many's host blocks on CUDA, page-locked in the background once written
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

    @property
    def store_fp16(self) -> bool:
        return self.precision == prec.FP16

    def _storage_dtype(self, src: torch.dtype) -> torch.dtype:
        return prec.storage_dtype(self.precision, src)

    def scale(self, key: Sequence[Any]) -> tuple[float, float] | None:
        """The (K, V) fp8 scales of ``key``; None when it is not stored as fp8."""
        if self._pending or self._unsynced:
            self.finalize()
        s = self._scales.get(key)  # type: ignore[arg-type]
        return None if s is None else (float(s[0]), float(s[1]))

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
            fp8 = bufs[0].dtype == prec.FP8_DTYPE
            if fp8:
                scale = prec.scales((k, v))
                host_scale = self._arena.empty((2,), torch.float32)
                host_scale.copy_(scale, non_blocking=scale.is_cuda)
                self._scales[key] = host_scale
            for i, (buf, src) in enumerate(zip(bufs, (k, v), strict=True)):
                if fp8:
                    src = prec.quantize(src, scale[i])
                elif src.dtype != buf.dtype:
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
        host_scales = None
        with torch.inference_mode(False), torch.no_grad():
            tensors = [t for _, k, v in items for t in (k, v)]
            if dtype == prec.FP8_DTYPE:
                scale = prec.scales(tensors)
                flat = torch.cat([prec.quantize(t, s).reshape(-1) for t, s in zip(tensors, scale, strict=True)])
                host_scales = self._arena.empty((len(items), 2), torch.float32)
                host_scales.copy_(scale.view(-1, 2), non_blocking=scale.is_cuda)
            else:
                flat = torch.cat([t.reshape(-1) for t in tensors])
                if flat.dtype != dtype:
                    flat = flat.to(dtype)
            if flat.device == self.device:  # kept where it was recorded: the gather is its only copy
                block = flat
            elif flat.is_cuda:  # pageable memory through the staging ring: no page-locking on the sampling path
                block, mapping = host_blocks.empty(total, dtype)
                if mapping is not None:
                    self._mappings.append(mapping)
                host_staging.ring().to_host(flat, block)
                self._staged = True
            else:
                block = self._arena.empty((total,), dtype)
                block.copy_(flat)
        entries = []
        offset = 0
        for row, ((key, k, _v), n) in enumerate(zip(items, sizes, strict=True)):
            key = key if isinstance(key, RefKey) else RefKey(*key)
            entries.append((key, offset, n, k.shape))
            if host_scales is not None:
                self._scales[key] = host_scales[row]
            offset += 2 * n
            self._kv[key] = None  # views are made on first read (see _materialize): cheap in the sampling loop
            if key.step >= self._seen_steps.get(key.pass_name, 0):
                self._seen_steps[key.pass_name] = key.step + 1
            self._channels[key.layer] = k.shape[-1]
        self._lazy.append((block, entries))
        if flat.is_cuda and (block is not flat or host_scales is not None):
            self._unsynced = True  # finalize() waits for the copies to the host (of the K/V, or of fp8 scales)
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
        if self._staged:
            host_staging.ring().drain()
            self._staged = False
        host_blocks.register_later(self._mappings)  # for Use: pinned uploads, off the sampling path
        self._mappings.clear()
        if self._kv:
            first = next(iter(self._kv.values()))[0]
            self.meta["dtype"] = str(first.dtype).replace("torch.", "")
        self.meta["precision"] = self.precision
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
        scale = self._scales.get(key)  # type: ignore[arg-type]
        if scale is None:
            return pair[0].to(device=device, dtype=dtype), pair[1].to(device=device, dtype=dtype)
        sk, sv = float(scale[0]), float(scale[1])
        k, v = (t.to(device, non_blocking=t.is_pinned()) if device is not None else t for t in pair)
        return prec.dequantize(k, sk, dtype), prec.dequantize(v, sv, dtype)

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
