"""RefDrop host memory: pinned CPU buffers carved from large slabs, and giving freed memory back to the OS."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger("lib_imgcond.memory")


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
