"""Native libraries the process has already loaded, reached through ctypes (their calls release the GIL)."""

from __future__ import annotations

import contextlib
import ctypes

import torch

_found: dict[str, ctypes.CDLL] = {}


def loaded(fragment: str) -> ctypes.CDLL | None:
    """The first already-mapped shared library whose path contains `fragment` (Linux), else None (asked again
    next time: it may be loaded later)."""
    if fragment not in _found:
        with contextlib.suppress(OSError), open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if fragment in line}
            for path in sorted(paths):
                with contextlib.suppress(OSError):
                    _found[fragment] = ctypes.CDLL(path)
                    break
    return _found.get(fragment)


def limit_threads(n: int) -> bool:
    """Cap the intra-op threads of torch's CPU ops issued from the calling thread at `n`, leaving every other thread
    and the process's settings as they are (OpenMP keeps the team size per thread; torch.set_num_threads would also
    change what new threads start with). Returns whether the cap holds."""
    n = max(1, int(n))
    torch.get_num_threads()  # torch's once-per-thread set-up runs first, so it cannot undo the cap afterwards
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    lib = loaded("libgomp") or loaded("libiomp")
    if lib is None:
        return False
    lib.omp_set_num_threads(ctypes.c_int(n))
    return torch.get_num_threads() == n
