"""Hires iterative mixing: time of a hires pass with and without mixing, on the SDXL-shaped UNet.

A k-diffusion-style Euler loop (CFG batch of 2) runs over the tail of a Karras schedule, as Forge's hires pass does
(denoising strength 0.5). With mixing, the sampler's own latent is mixed in place before every model call by
`lib_imgcond.mixing.mixer.HiresMixer`, the object the Forge glue hands the sampler. Usage:

    python benchmarks/mixing_bench.py --size 1536 --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sdxl_shaped import SDXLShapedUNet
from lib_imgcond.mixing.mixer import HiresMixer
from lib_imgcond.mixing.schedules import MixParams


def karras(n: int, sigma_min: float = 0.03, sigma_max: float = 14.6, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1)])


def hires_pass(model, z_up, noise, sigmas, context, y, mixer: HiresMixer | None, cfg: float = 7.0) -> torch.Tensor:
    x = z_up + noise * sigmas[0]
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        if mixer is not None:
            mixer.mix_(x, sigma)
        c_in = 1 / (sigma**2 + 1) ** 0.5
        xin = torch.cat([x, x]).to(torch.bfloat16) * c_in
        eps = model(xin, sigma.expand(2).to(x.device) * 100, context, y).float()
        uncond, cond = eps.chunk(2)
        denoised = x - sigma * (uncond + cfg * (cond - uncond))
        d = (x - denoised) / sigma
        x = x + d * (sigmas[i + 1] - sigma)
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1536, help="hires image side in pixels")
    ap.add_argument("--steps", type=int, default=20, help="hires steps before denoising-strength truncation")
    ap.add_argument("--denoise", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = SDXLShapedUNet().to(dev, torch.bfloat16).eval()
    side = args.size // 8
    z_up = torch.randn(1, 4, side, side, device=dev)
    noise = torch.randn_like(z_up)
    full = karras(args.steps).to(dev)
    t_enc = int(args.denoise * args.steps)
    sigmas = full[args.steps - t_enc - 1 :]
    context = torch.randn(2, 77, 2048, device=dev, dtype=torch.bfloat16)
    y = torch.randn(2, 2816, device=dev, dtype=torch.bfloat16)
    params = MixParams().validate()
    times: dict[str, list[float]] = {"plain": [], "mixing": []}
    with torch.inference_mode():
        hires_pass(model, z_up, noise, sigmas, context, y, None)  # warm-up
        for _ in range(args.repeats):
            for mode in ("plain", "mixing"):
                mixer = HiresMixer(params, sigmas, z_up, noise) if mode == "mixing" else None
                sync()
                t0 = time.perf_counter()
                hires_pass(model, z_up, noise, sigmas, context, y, mixer)
                sync()
                times[mode].append(time.perf_counter() - t0)
    plain, mixing = statistics.median(times["plain"]), statistics.median(times["mixing"])
    steps = len(sigmas) - 1
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"device: {name}  size {args.size}² (latent {side}²), {steps} hires steps, batch 2")
    print(f"plain  : {plain * 1000:.1f} ms/pass ({plain / steps * 1000:.2f} ms/step)  runs {times['plain']}")
    print(f"mixing : {mixing * 1000:.1f} ms/pass ({mixing / steps * 1000:.2f} ms/step)  runs {times['mixing']}")
    print(f"ratio  : {mixing / plain:.4f}")


if __name__ == "__main__":
    main()
