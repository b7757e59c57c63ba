"""Is a lone batch-1 UNet op bit-identical to the same row of a batch-2 (cond + uncond) call? (RefDrop trajectories)

A trajectory reference is replayed through the model at Use time; its K/V must equal the recorded ones bit for bit
for a same-seed Record → Use to give the plain image. This prints, for the UNet's ops at SD1.5/SDXL-like shapes,
whether row 1 of a batch-2 call equals a batch-1 call on that row. On the CPU (torch 2.14, 2 threads) the 3×3
convolution at 320 channels on an 8×8 latent (the e2e suite's 64² images) differs by ~1e-6, so the replay keeps
the recorded batch composition (cond and uncond rows in one call).

    python benchmarks/unet_batch_invariance.py --device cpu
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    ok = True

    def check(name: str, fn, x: torch.Tensor) -> None:
        nonlocal ok
        whole, lone = fn(x)[1:2], fn(x[1:2].clone())
        same = torch.equal(whole, lone)
        ok &= same
        print(f"{name:34s} identical {same}  max diff {(whole - lone).abs().max().item():.3g}")

    with torch.no_grad():
        for channels, side in ((320, 8), (320, 64), (640, 32), (1280, 16), (320, 128)):
            conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dev, dtype)
            norm = torch.nn.GroupNorm(32, channels).to(dev, dtype)
            linear = torch.nn.Linear(channels, channels).to(dev, dtype)
            x = torch.randn(2, channels, side, side, device=dev, dtype=dtype)
            tokens = torch.randn(2, side * side, channels, device=dev, dtype=dtype)
            q = torch.randn(2, channels // 64, side * side, 64, device=dev, dtype=dtype)
            check(f"conv3x3 {channels} ch {side}²", conv, x)
            check(f"groupnorm {channels} ch {side}²", norm, x)
            check(f"linear {side * side} tokens × {channels}", linear, tokens)
            check(f"sdpa {side * side} tokens × {channels}", lambda a: F.scaled_dot_product_attention(a, a, a), q)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch-invariant: {ok}")


if __name__ == "__main__":
    main()
