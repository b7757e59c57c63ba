"""Measurements around the RefDrop benchmark's timed passes (refdrop_bench.py): dropping the recorded references
(timed), torch's pinned host allocator (its counters, emptying its cache), checksums of latents and references,
pinned copy bandwidth, and torch.profiler tables with labels around the store calls the patch makes.

The lib_imgcond under test comes in as arguments (its modules, or the `Lib` on the `Bench`); this module imports none.
"""

from __future__ import annotations

import gc
import os
import time
from contextlib import contextmanager
from typing import Any

import torch
from refdrop_bench_lib import Lib
from refdrop_bench_runner import Bench


def drop_references(library: Any) -> float:
    """Drop the recorded references ``library`` (lib_imgcond.refdrop.forge_library) holds (callers let go of theirs
    first); returns the seconds it took (unregistering and unmapping them)."""
    t0 = time.perf_counter()
    library.REFERENCES.clear()
    gc.collect()
    return time.perf_counter() - t0


def empty_host_cache() -> bool:
    fn = getattr(torch._C, "_host_emptyCache", None) or getattr(torch._C, "_accelerator_emptyHostCache", None)
    if fn is None:
        return False
    fn()
    return True


def host_stats() -> dict[str, Any]:
    """torch's pinned host allocator counters (names vary by torch version), flattened."""
    try:
        stats = torch.cuda.host_memory_stats()
    except (AttributeError, RuntimeError):
        return {}
    return {k: (v if isinstance(v, int | float) else str(v)) for k, v in dict(stats).items()}


def checksum(t: torch.Tensor) -> str:
    t = t.double()
    return f"sum {t.sum().item():.6e} abs {t.abs().sum().item():.6e} finite {bool(torch.isfinite(t).all())}"


def reference_checksum(ref: Any, steps: int) -> str:
    keys = [k for k in ref if k.step in (0, steps // 2, steps - 1)]
    total = sum(ref.get(k)[i].double().sum().item() for k in keys for i in (0, 1))
    return f"{len(keys)} pairs, sum {total:.6e}"


@contextmanager
def labelled_store_calls(lib: Lib):
    """Profiler labels around the store calls the patch makes (restored afterwards)."""
    patched = []

    def wrap(cls, name):
        orig = cls.__dict__[name]
        if isinstance(orig, property):

            def getter(self, _f=orig.fget):
                with torch.profiler.record_function(f"{cls.__name__}.{name}"):
                    return _f(self)

            setattr(cls, name, property(getter))
        else:

            def fn(*a, _f=orig, **kw):
                with torch.profiler.record_function(f"{cls.__name__}.{name}"):
                    return _f(*a, **kw)

            setattr(cls, name, fn)
        patched.append((cls, name, orig))

    reference, prefetch, patch = lib.reference, lib.prefetch, lib.patch
    for cls, name in [
        (reference.Reference, "put"),
        (reference.Reference, "put_many"),
        (reference.Reference, "get"),
        (reference.Reference, "nbytes"),
        (prefetch.Prefetcher, "fetch"),
        (prefetch.Prefetcher, "get"),
        (patch.Runner, "attend"),  # the whole per-layer work of the patch (the host's attention included)
        (patch.Runner, "flush"),
        (patch.ReferenceSource, "get"),
        (patch.ReferenceSource, "prepare"),
    ]:
        wrap(cls, name)
    try:
        yield
    finally:
        for cls, name, orig in patched:
            setattr(cls, name, orig)


def profile(bench: Bench, mode: str, ref: Any, steps: int, out_dir: str | None) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if bench.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with labelled_store_calls(bench.lib), torch.profiler.profile(activities=activities) as prof:
        bench.run_once(mode, steps, ref)
    events = prof.key_averages()
    cpu_table = events.table(sort_by="self_cpu_time_total", row_limit=25)
    dev_table = ""
    if len(activities) > 1:
        for key in ("self_device_time_total", "self_cuda_time_total"):
            try:
                dev_table = events.table(sort_by=key, row_limit=25)
                break
            except (AttributeError, KeyError, ValueError):
                continue
    if out_dir:
        with open(os.path.join(out_dir, f"profile_{mode}.txt"), "w") as f:
            f.write(f"{mode}: {steps} steps\n\nby self CPU time\n{cpu_table}\n\nby self device time\n{dev_table}\n")
    lines = []
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]:
        per_step = e.self_cpu_time_total / 1e3 / steps
        lines.append(f"  {e.key[:40]:40s} calls {e.count:6d}  self CPU {per_step:8.2f} ms/step")
    prefixes = ("Reference.", "Prefetcher.", "Runner.", "ReferenceSource.")
    labels = [e for e in events if e.key.startswith(prefixes) and e.cpu_time_total > 0]  # not the CUDA-side copies
    for e in labels:
        lines.append(f"  [{e.key}] calls {e.count:6d}  CPU total {e.cpu_time_total / 1e3 / steps:8.2f} ms/step")
    return "\n".join(lines)


def bandwidth(device: torch.device) -> dict[str, float]:
    """Pinned host↔device copy rates for context (GB/s)."""
    n = 512 * 2**20
    host_buf = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    out = {}
    for name, dst, src in (("h2d", dev, host_buf), ("d2h", host_buf, dev)):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        out[name] = 5 * n / (time.perf_counter() - t0) / 1e9
    return out
