"""refdrop_bench.py --mode batch: mode Batch (consistent batch) at batch --batch, timed against the same plain batch
on the SDXL-shaped UNet of the `Bench`, and its report (stdout, and results.json under --out)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch
from refdrop_bench_runner import Bench, FakeUnetPatcher, make_values
from sdxl_shaped import attention


def batch_mode(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Mode Batch (consistent batch) at batch --batch (2·batch rows: uncond then cond), timed against the same plain
    batch: per round one plain pass and one consistent pass, the ratio the median of the per-round ratios."""
    b, device, lib = args.batch, bench.device, bench.lib
    g = torch.Generator(device="cpu").manual_seed(3)
    x0 = torch.randn(b, 4, args.height // 8, args.width // 8, generator=g).to(device)
    context = torch.cat([bench.context[0:1].expand(b, -1, -1), bench.context[1:2].expand(b, -1, -1)])
    y = torch.cat([bench.y[0:1].expand(b, -1), bench.y[1:2].expand(b, -1)])
    values = {**make_values("Batch", args.coefficient), "image": None, "rate": args.rate, "prompt_lines": ""}
    values["batch_sets"] = "each batch its own set"

    def one(on: bool) -> float:
        patcher = None
        if on:
            job = lib.host.Job(values, "sdxl", bench.layers, batch_seed=1)
            patcher = FakeUnetPatcher(bench.keys)
            lib.installer.install(patcher, job, lib.patch.PassTracker("first", args.steps), attention)
        opts = patcher.model_options if patcher else {"transformer_options": {}}
        sigmas = torch.linspace(14.6, 0.03, args.steps + 1).to(device)
        bench.sync()
        t0 = time.perf_counter()
        x = x0.clone()
        for i in range(args.steps):
            sigma = sigmas[i : i + 1]
            float(sigma)
            for fn in opts.get("conditioning_modifiers", []):
                fn(None, x, sigma, None, None, 7.0, {}, 0)
            topts = dict(opts["transformer_options"], cond_or_uncond=[1, 0], sigmas=sigma.expand(2 * b))
            uncond, cond = bench.model(torch.cat([x, x]), sigma.expand(2 * b) * 70.0, context, y, topts).chunk(2)
            x = x + (uncond + 7.0 * (cond - uncond) - x) * (sigmas[i + 1] - sigma) / sigma
        bench.sync()
        last[on] = x
        return time.perf_counter() - t0

    last: dict[bool, torch.Tensor] = {}
    one(False), one(True)  # warm-up
    rounds = [(one(False), one(True)) for _ in range(args.repeats)]
    ratios = [on / off for off, on in rounds]
    return {
        "batch": b,
        "rate": args.rate,
        "coefficient": args.coefficient,
        "steps": args.steps,
        "off_s": statistics.median(off for off, _ in rounds),
        "batch_s": statistics.median(on for _, on in rounds),
        "ratio": statistics.median(ratios),
        "ratio_spread": [min(ratios), max(ratios)],
        "latent_max_diff_vs_off": float((last[True].float() - last[False].float()).abs().max()),  # > 0: it ran
    }


def report_batch(res: dict[str, Any], out_dir: str | None, results: dict[str, Any]) -> None:
    steps = res["steps"]
    print(
        f"consistent batch (mode Batch) at batch {res['batch']}, rate {res['rate']}, c {res['coefficient']}: "
        f"off {1e3 * res['off_s'] / steps:.2f} ms/step, Batch {1e3 * res['batch_s'] / steps:.2f} ms/step, "
        f"x{res['ratio']:.3f} [{res['ratio_spread'][0]:.3f}-{res['ratio_spread'][1]:.3f}]; "
        f"latent max diff vs off {res['latent_max_diff_vs_off']:.3g}"
    )
    if out_dir:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump({**results, "batch_mode": res}, f, indent=2)
