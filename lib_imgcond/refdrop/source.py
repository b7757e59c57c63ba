"""RefDrop Use: reference K/V on the sampling device for one pass (resident uploads, prefetch, live captures)."""

from __future__ import annotations

import math

import torch

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.memory import host_staging
from lib_imgcond.refdrop import precision as prec
from lib_imgcond.refdrop import prefetch, reference


class ReferenceSource:
    """Reference K/V on the sampling device, for one pass.

    On CUDA a reference kept in GPU memory is read in place. Another whose K/V for the pass fit comfortably in free
    VRAM (at most 40 %) is uploaded once, on a side stream, each evaluation's tensors behind their own event; others
    are prefetched one evaluation ahead of use. On the CPU the stored tensors are used as they are (cast once per
    evaluation if the dtype differs)."""

    RESIDENT_SHARE = 0.4

    def __init__(self, uses: list, order: list, recording: reference.Reference | None = None):
        self.uses, self.order = uses, order
        self.recording = recording  # Image mode: the reference being captured in this very pass
        self.live: dict = {}  # (id(reference), RefKey) -> device (k, v) captured for the current evaluation
        self.resident: dict[tuple, dict] = {}  # (i, name) -> {(e, layer): (k, v)}
        self.events: dict[tuple, list] = {}  # (i, name, e, layer) -> uploads to wait for before reading it
        self.waited: set = set()  # the uploads already waited for
        self.prefetchers: dict[int, prefetch.Prefetcher] = {}
        self.current: dict[tuple, tuple] = {}  # (i, name, e, layer) -> (k, v), this evaluation (CPU and fallbacks)
        self.stream = None
        self.device, self.dtype = None, None

    def release(self) -> None:
        self.recording = None
        self.waited.clear()
        for table in (self.live, self.resident, self.events, self.prefetchers, self.current):
            table.clear()

    def prepare(self, tasks: list, device, dtype) -> None:
        self.current.clear()
        self.device, self.dtype = device, dtype
        if device.type != "cuda":
            return
        for i, name, _branch, e, _c in tasks:
            ref = self.uses[i][0]
            if ref is self.recording or getattr(ref, "replayed", False):
                continue  # read from `live`
            if (i, name) not in self.resident and not self._upload(i, ref, name, device, dtype):
                self.resident[(i, name)] = None  # too large: prefetch per evaluation instead
            if self.resident.get((i, name)) is None:
                pf = self.prefetchers.get(i)
                if pf is None:
                    pf = self.prefetchers[i] = prefetch.Prefetcher(ref, device, dtype)
                pf.fetch([(name, e, *layer) for layer in self.order])

    def _upload(self, i: int, ref, name: str, device, dtype) -> bool:
        """Copy a reference pass to the GPU storage by storage (a few large host blocks, not thousands of tensors),
        then take views; each evaluation waits only for the blocks that hold its K/V. A recording kept in this GPU's
        memory is read where it is (no upload; cast on the device if its dtype differs)."""
        wanted = set(self.order)
        keys = sorted((key for key in ref if key.pass_name == name and key.layer in wanted), key=lambda x: x.step)
        if getattr(ref, "device", None) == device:  # kept in this GPU's memory: its own views, unless cast
            table = {(key.step, key.layer): ref.get(key) for key in keys}
            if all(ref.scale(key) is None and table[(key.step, key.layer)][0].dtype == dtype for key in keys):
                self.resident[(i, name)] = table
                return True
        storages: dict[int, tuple] = {}  # data_ptr -> (storage, upload order)
        layout = []
        for key in keys:
            scale = ref.scale(key) or (None, None)  # fp8: dequantised on the device after the upload
            for t, s in zip(ref.get(key), scale, strict=True):
                st = t.untyped_storage()
                if st.data_ptr() not in storages:
                    storages[st.data_ptr()] = (st, len(storages))
                layout.append((key, st.data_ptr(), t.storage_offset() * t.element_size(), t.shape, t.dtype, s))
        # pageable storage (a recording's, through the staging ring) goes up through the ring on a worker, unless
        # its tensors are cast on the device after the upload (those casts must queue after the copies); storage
        # already on this device (a recording kept in GPU memory) is read in place
        cast = {ptr for _key, ptr, _o, _shape, t_dtype, s in layout if s is not None or t_dtype != dtype}
        here = {ptr for ptr, (st, _order) in storages.items() if st.device == device}
        size = torch.empty(0, dtype=dtype).element_size()
        need = sum(size * math.prod(shape) for _key, ptr, _o, shape, _d, _s in layout if ptr in cast or ptr not in here)
        free, _total = torch.cuda.mem_get_info(device)
        if need > free * self.RESIDENT_SHARE:
            return False
        self.stream = self.stream or torch.cuda.Stream(device=device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        uploaded, handles = {}, {}
        with torch.cuda.stream(self.stream):
            for ptr, (st, _order) in storages.items():
                host = torch.empty(0, dtype=torch.uint8, device=st.device).set_(st)
                if ptr in here:
                    uploaded[ptr] = host  # written on the sampling stream, which this one waits for
                elif host.is_pinned() or ptr in cast:
                    uploaded[ptr] = host.to(device, non_blocking=host.is_pinned())
                    handles[ptr] = torch.cuda.Event()
                    handles[ptr].record(self.stream)
                else:
                    uploaded[ptr] = torch.empty(host.shape, dtype=torch.uint8, device=device)
                    handles[ptr] = host_staging.ring().to_device(host, uploaded[ptr], self.stream)
            table: dict = {}
            waits: dict[tuple, dict] = {}  # (step, layer) -> the uploads holding its K/V
            for key, ptr, offset, shape, t_dtype, s in layout:
                n = t_dtype.itemsize * math.prod(shape)
                t = uploaded[ptr][offset : offset + n].view(t_dtype).view(shape)
                if s is not None:
                    t = prec.dequantize(t, s, dtype)
                elif t.dtype != dtype:
                    t = t.to(dtype)
                table.setdefault((key.step, key.layer), []).append(t)
                held = waits.setdefault((key.step, key.layer), {})
                if ptr in handles:
                    held[ptr] = handles[ptr]
        self.resident[(i, name)] = {k: tuple(v) for k, v in table.items()}
        for (e, layer), held in waits.items():
            self.events[(i, name, e, layer)] = list(held.values())
        return True

    def get(self, i: int, name: str, e: int, layer: tuple) -> tuple:
        ref = self.uses[i][0]
        replayed = getattr(ref, "replayed", False)
        if self.live and (ref is self.recording or replayed):
            hit = self.live.get((id(ref), reference.RefKey(name, e, *layer)))
            if hit is not None:
                return hit
        if replayed:
            raise ImgcondError(f"RefDrop: the replay of '{ref.name}' gave no K/V for {layer} at evaluation {e}")
        table = self.resident.get((i, name))
        if table is not None:
            for handle in self.events.pop((i, name, e, layer), ()):
                if handle not in self.waited:  # each block once per pass, when its first layer is read
                    self.waited.add(handle)
                    if isinstance(handle, host_staging.Upload):
                        handle.wait()
                    else:
                        torch.cuda.current_stream().wait_event(handle)
            return table[(e, layer)]
        ck = (i, name, e, layer)
        hit = self.current.get(ck)
        if hit is None:
            pf = self.prefetchers.get(i)
            ref = self.uses[i][0]
            if pf is not None:
                hit = pf.get((name, e, *layer))
            else:
                hit = ref.get((name, e, *layer), device=self.device, dtype=self.dtype)
            self.current[ck] = hit
        return hit
