"""Is attention over a sub-batch bit-identical to the same rows of a whole-batch call? (RefDrop's exactness)

RefDrop computes the reference branch for the cond rows only on CUDA, and over the whole batch on the CPU, where
some kernels are not batch-size invariant. This prints, for SDXL's self-attention shapes, whether the rows agree.

    python benchmarks/attention_batch_invariance.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sdxl_shaped import attention

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    g = torch.Generator(device=dev).manual_seed(0)
    ok = True
    for tokens, channels in ((4096, 640), (1024, 1280), (256, 1280), (64, 320), (4, 1280)):
        q, k, v = (torch.randn(2, tokens, channels, device=dev, dtype=dtype, generator=g) for _ in range(3))
        heads = channels // 64
        whole = attention(q, k, v, heads)[1:2]
        rows = attention(q[1:2], k[1:2].clone(), v[1:2].clone(), heads)
        same = torch.equal(whole, rows)
        ok &= same
        print(f"{tokens:5d} tokens × {channels:4d}: identical {same}  max diff {(whole - rows).abs().max().item():.3g}")
    print("batch-invariant:", ok)


if __name__ == "__main__":
    main()
