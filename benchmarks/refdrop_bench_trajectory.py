"""refdrop_bench.py --mode trajectory: per-step cost of Use with a trajectory reference (RefDrop's "Reference
storage: Trajectory") against off, on the same SDXL-shaped UNet.

A trajectory reference is recorded first (seed x0, through lib_imgcond's own record wrapper), then --repeats rounds
of off and Use (another seed) run interleaved; the ratio is the median of the per-round ratios. Use replays the
reference's evaluation through the model each step (cond and uncond rows, as recorded) before the real call, so its
cost is about one extra batch-2 model call per step plus the blend. Both passes call the model through the model
function wrapper as Forge's calc_cond_uncond_batch does.

    python3 benchmarks/refdrop_bench.py --mode trajectory --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch
from refdrop_bench_lib import Lib
from refdrop_bench_runner import FakeUnetPatcher, make_values
from sdxl_shaped import attention


def sample_wrapped(bench: Any, patcher: Any, steps: int, x0: torch.Tensor) -> torch.Tensor:
    """Bench.sample, with the model called through model_options' function wrapper as Forge's calc_cond_uncond_batch
    does (apply_model takes sigma; the model gets sigma · 70 as its timestep, like Bench.sample)."""
    opts = patcher.model_options if patcher else {"transformer_options": {}}
    wrapper = opts.get("model_function_wrapper")
    model = bench.model

    def apply_model(x, t, c_crossattn=None, y=None, transformer_options=None):
        return model(x, t * 70.0, c_crossattn, y, transformer_options)

    x = x0.clone()
    sigmas = torch.linspace(14.6, 0.03, steps + 1).to(bench.device)
    for i in range(steps):
        sigma = sigmas[i : i + 1]
        float(sigma)  # a k-diffusion sampler reads sigma on the host every step
        for fn in opts.get("conditioning_modifiers", []):
            fn(None, x, sigma, None, None, 7.0, {}, 0)
        topts = dict(opts["transformer_options"], cond_or_uncond=[1, 0], sigmas=sigma.expand(2))
        c = {"c_crossattn": bench.context, "y": bench.y, "transformer_options": topts}
        args = {"input": torch.cat([x, x]), "timestep": sigma.expand(2), "c": c, "cond_or_uncond": [1, 0]}
        out = wrapper(apply_model, args) if wrapper else apply_model(args["input"], args["timestep"], **c)
        uncond, cond = out.chunk(2)
        x = x + (uncond + 7.0 * (cond - uncond) - x) * (sigmas[i + 1] - sigma) / sigma
    return x


def run(bench: Any, args: argparse.Namespace, lib: Lib) -> dict[str, Any]:
    """Record a trajectory reference, then time off and Use; `lib` is the lib_imgcond under test (load_lib's)."""
    import importlib

    host, installer, patch, arena = lib.host, lib.installer, lib.patch, lib.arena
    rt = importlib.import_module("lib_imgcond.refdrop.trajectory")

    class Patcher(FakeUnetPatcher):
        def set_model_unet_function_wrapper(self, fn) -> None:
            self.model_options["model_function_wrapper"] = fn

    def patched(mode: str, ref: Any = None) -> tuple:
        values = {**make_values(mode, args.coefficient), "storage": "Trajectory"}
        job = host.Job(values, "sdxl", bench.layers)
        if mode == "Record":
            job.trajectory = rt.Trajectory("bench", "sdxl", {"width": args.width, "height": args.height})
        else:
            job.uses = [(ref, args.coefficient)]
        tracker = patch.PassTracker("first", args.steps)
        patcher = Patcher(bench.keys)
        installer.install(patcher, job, tracker, attention)
        return job, tracker, patcher

    def timed(patcher: Any, x0: torch.Tensor) -> float:
        bench.sync()
        t0 = time.perf_counter()
        bench.last_x = sample_wrapped(bench, patcher, args.steps, x0)
        bench.sync()
        return time.perf_counter() - t0

    job, tracker, patcher = patched("Record")
    record_s = timed(patcher, bench.x0)
    ref = host.finish_record(job, {"first": tracker}, save_file=False)
    sample_wrapped(bench, patched("Use", ref)[2], max(2, args.steps // 10), bench.x0_use)  # warm-up
    off, use = [], []
    for _ in range(args.repeats):
        off.append(timed(None, bench.x0_use))
        use.append(timed(patched("Use", ref)[2], bench.x0_use))
    ratio = statistics.median(u / o for u, o in zip(use, off, strict=True))
    per_step = [1e3 * statistics.median(runs) / args.steps for runs in (off, use)]
    print(f"trajectory reference: {len(ref)} evaluations, {arena.format_bytes(ref.nbytes)} ({ref.nbytes} bytes)")
    print(f"\n| mode | ms/step (median of {args.repeats}) | × off |\n|---|---|---|")
    print(f"| off | {per_step[0]:.2f} | 1.000 |")
    print(f"| trajectory record | {1e3 * record_s / args.steps:.2f} | {record_s / statistics.median(off):.3f} |")
    print(f"| trajectory use | {per_step[1]:.2f} | {ratio:.3f} |")
    results = {"reference_bytes": ref.nbytes, "off_s": off, "use_s": use, "record_s": record_s, "use_ratio": ratio}
    plain = sample_wrapped(bench, None, args.steps, bench.x0)  # the recorded seed: Use must give it back
    same = sample_wrapped(bench, patched("Use", ref)[2], args.steps, bench.x0)
    results["same_seed_max_diff"] = (same.float() - plain.float()).abs().max().item()
    print(f"same-seed Record -> Use vs off, final latent: max abs difference {results['same_seed_max_diff']:.3e}")
    if args.out:
        with open(os.path.join(args.out, "results_trajectory.json"), "w") as f:
            json.dump({"args": vars(args), **results}, f, indent=2)
    return results
