"""Host-memory rates that bound RefDrop's first ("cold") recording on a CUDA host, in GB/s.

  pin alloc          torch.empty(pin_memory=True) of fresh 256 MiB blocks (cudaHostAlloc: allocate and page-lock)
  pin alloc register the same with the allocator setting pinned_use_cuda_host_register (malloc, pages touched by
                     pinned_num_register_threads threads, then cudaHostRegister)
  pageable fill      fresh pageable blocks written by a copy from a pinned block (first touch of their pages)
  pageable reuse     the same blocks written again (no page faults)
  d2h pinned         device → pinned host copies
  h2d pageable       pageable host → device copies (synchronous)

Run:  python3 benchmarks/pinning_rates.py --gib 4
"""

from __future__ import annotations

import argparse
import time

import torch

BLOCK = 256 << 20


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def threaded_fill(src: torch.Tensor, n: int, workers: int) -> None:
    import threading

    def work(count: int) -> None:
        for _ in range(count):
            torch.empty(BLOCK, dtype=torch.uint8).copy_(src)

    share = [n // workers + (i < n % workers) for i in range(workers)]
    pool = [threading.Thread(target=work, args=(c,)) for c in share]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=4.0, help="bytes per measurement")
    parser.add_argument("--threads", type=int, default=16, help="pinned_num_register_threads")
    args = parser.parse_args()
    n = int(args.gib * 2**30) // BLOCK
    total = n * BLOCK
    name, threads = torch.cuda.get_device_name(), torch.get_num_threads()
    print(f"{name}, torch {torch.__version__}, {n} blocks of 256 MiB, {threads} CPU threads")
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            print("transparent huge pages:", f.read().strip())
    except OSError:
        pass
    dev = torch.empty(BLOCK, dtype=torch.uint8, device="cuda")
    out = {}

    blocks = []
    out["pin alloc"] = rate(
        total, timed(lambda: blocks.extend(torch.empty(BLOCK, dtype=torch.uint8, pin_memory=True) for _ in range(n)))
    )
    src = blocks[0]
    out["d2h pinned"] = rate(total, timed(lambda: [b.copy_(dev, non_blocking=True) for b in blocks]))
    pageable = []

    def fill():
        for _ in range(n):
            p = torch.empty(BLOCK, dtype=torch.uint8)
            p.copy_(src)
            pageable.append(p)

    out["pageable fill"] = rate(total, timed(fill))
    out["pageable reuse"] = rate(total, timed(lambda: [p.copy_(src) for p in pageable]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for workers in (1, 2, 4, 8):  # fresh pages written by `workers` Python threads of one intra-op thread each
        out[f"pageable fill x{workers}"] = rate(total, timed(lambda w=workers: threaded_fill(src, n, w)))
    torch.set_num_threads(threads)
    huge = []

    def fill_huge():  # anonymous mappings advised to use transparent huge pages: a fault per 2 MiB, not per 4 KiB
        import mmap

        for _ in range(n):
            mm = mmap.mmap(-1, BLOCK)
            mm.madvise(mmap.MADV_HUGEPAGE)
            t = torch.frombuffer(mm, dtype=torch.uint8)
            t.copy_(src)
            huge.append(t)

    out["huge-page fill"] = rate(total, timed(fill_huge))
    cudart = torch.cuda.cudart()

    def register_huge():
        for t in huge:
            assert cudart.cudaHostRegister(t.data_ptr(), t.numel(), 0) == 0

    out["huge-page register"] = rate(total, timed(register_huge))
    out["h2d registered"] = rate(total, timed(lambda: [dev.copy_(t, non_blocking=True) for t in huge]))
    for t in huge:
        cudart.cudaHostUnregister(t.data_ptr())
    huge.clear()
    out["h2d pageable"] = rate(total, timed(lambda: [dev.copy_(p) for p in pageable]))
    out["h2d pinned"] = rate(total, timed(lambda: [dev.copy_(b, non_blocking=True) for b in blocks]))
    blocks.clear()
    pageable.clear()
    src = None
    torch._C._host_emptyCache()
    try:
        torch.cuda.memory._set_allocator_settings(
            f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{args.threads}"
        )
        again = []
        out["pin alloc register"] = rate(
            total, timed(lambda: again.extend(torch.empty(BLOCK, dtype=torch.uint8, pin_memory=True) for _ in range(n)))
        )
        out["register pinned?"] = float(again[0].is_pinned())
    except (RuntimeError, AttributeError) as e:
        print("allocator setting refused:", e)
    for k, v in out.items():
        print(f"{k:20s} {v:8.2f}")


if __name__ == "__main__":
    main()
