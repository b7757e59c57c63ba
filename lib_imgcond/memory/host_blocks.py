"""Host blocks for a recording's K/V on CUDA: anonymous mappings (transparent huge pages where Linux offers them),
page-locked for CUDA on a worker thread once written, and unlocked before they are unmapped.

First-touch page faults bound a recording's copies into fresh pageable memory (1.6–2.0 GB/s per thread with 4 KiB
pages on an H200 host); a huge page takes one fault per 2 MiB. A finished recording is then registered with
cudaHostRegister (19 GB/s on huge pages there) in the background, so that a later Use uploads it as pinned memory,
asynchronously and at full speed, instead of through the staging ring. Registration locks no extra RAM (the pages
are the reference's own) and is capped at REGISTER_SHARE of physical memory; a block still being registered, or over
the cap, is simply uploaded through the ring.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import queue
import threading
import weakref

import torch

from lib_imgcond.memory import native

log = logging.getLogger("lib_imgcond.memory")

HUGE_PAGE = 2 << 20
MIN_MAPPED = 8 << 20  # smaller blocks are plain allocations (not registered)
REGISTER_SHARE = 0.5  # most of physical RAM registration may keep page-locked
PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context
HUGE_PAGES = os.environ.get("IMGCOND_HUGE_PAGES", "1") != "0"  # "0": 4 KiB pages (benchmarks compare both)


class Mapping(mmap.mmap):
    """An anonymous private mapping that is unregistered from CUDA before it is unmapped."""

    address = 0
    registered = False

    def __del__(self):
        # on the thread that drops it, not the worker: cudaHostUnregister stalls the device, so a release racing a
        # sampling pass would cost more than one between generations (where references are dropped)
        if self.registered:
            self.registered = False
            _release(self.address, len(self))


def empty(numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, Mapping | None]:
    """A 1-D host tensor of `numel` elements and the Mapping behind it (None for a small plain allocation)."""
    nbytes = numel * dtype.itemsize
    if nbytes < MIN_MAPPED:
        return torch.empty((numel,), dtype=dtype), None
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    private = getattr(mmap, "MAP_PRIVATE", None)  # not shared memory: plain anonymous pages (Windows: no flags)
    m = Mapping(-1, size) if private is None else Mapping(-1, size, flags=private | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and HUGE_PAGES:
        with contextlib.suppress(OSError):
            m.madvise(advice)
    t = torch.frombuffer(m, dtype=torch.uint8, count=nbytes)  # keeps `m` alive as long as its storage lives
    m.address = t.data_ptr()
    return t.view(dtype), m


# --- background registration ------------------------------------------------------------------------------------
_jobs: queue.Queue = queue.Queue()
_lock = threading.Lock()
_state = {"thread": None, "locked": 0, "failed": False, "api": None}


def register_later(mappings: list[Mapping]) -> None:
    """Queue `mappings` (fully written) for page-locking on the worker thread; a no-op without CUDA."""
    if not mappings or _state["failed"] or not torch.cuda.is_available():
        return
    with _lock:
        if _state["thread"] is None:
            _state["thread"] = threading.Thread(target=_work, name="imgcond-register", daemon=True)
            _state["thread"].start()
    for m in mappings:
        _jobs.put(weakref.ref(m))


def idle() -> None:
    """Wait until every queued registration is done (tests and benchmarks)."""
    _jobs.join()


def locked_bytes() -> int:
    return _state["locked"]


def _work() -> None:
    while True:
        job = _jobs.get()
        try:
            m = job()
            if m is not None and not m.registered and not _state["failed"]:
                _register(m)
            del m
        except Exception as e:  # registration is an optimisation: log once and stop trying
            _state["failed"] = True
            log.warning("RefDrop: page-locking recorded K/V failed (%s); uploading them unpinned from now on", e)
        finally:
            _jobs.task_done()


def _register(m: Mapping) -> None:
    size = len(m)
    with _lock:
        if _state["locked"] + size > REGISTER_SHARE * _physical_ram():
            return
        _state["locked"] += size
    err = _api()[0](m.address, size, PORTABLE)
    if err != 0:
        with _lock:
            _state["locked"] -= size
        raise RuntimeError(f"cudaHostRegister returned {err}")
    m.registered = True


def _release(address: int, size: int) -> None:
    with contextlib.suppress(Exception):  # runs from __del__: never raise there
        _api()[1](address)
    with _lock:
        _state["locked"] -= size


def _api():
    """(register, unregister): libcudart through ctypes where the process has loaded it (the call releases the GIL),
    else torch's bindings."""
    if _state["api"] is None:
        lib = native.loaded("libcudart.so")
        if lib is not None:
            lib.cudaHostRegister.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)
            lib.cudaHostUnregister.argtypes = (ctypes.c_void_p,)
            _state["api"] = (lib.cudaHostRegister, lib.cudaHostUnregister)
        else:
            rt = torch.cuda.cudart()
            _state["api"] = (lambda p, n, f: int(rt.cudaHostRegister(p, n, f)), rt.cudaHostUnregister)
    return _state["api"]


def _physical_ram() -> int:
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(ImportError):
        import psutil

        return int(psutil.virtual_memory().total)
    return 0
