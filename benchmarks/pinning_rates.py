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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=4.0, help="bytes per measurement")
    parser.add_argument("--threads", type=int, default=16, help="pinned_num_register_threads")
    args = parser.parse_args()
    n = int(args.gib * 2**30) // BLOCK
    total = n * BLOCK
    name, threads = torch.cuda.get_device_name(), torch.get_num_threads()
    print(f"{name}, torch {torch.__version__}, {n} blocks of 256 MiB, {threads} CPU threads")
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
