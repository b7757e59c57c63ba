"""Per-step cost of RefDrop on a Flux.1-dev-shaped transformer (11.9 B, bf16, random weights: flux_shaped.py).

Modes, each a whole sampling pass of --steps Euler steps at batch 1 (Flux.1-dev is guidance-distilled: no uncond row):
  off     nothing installed
  record  lib_imgcond.refdrop.forge_install.install with Job.record: the image-token K/V of all 19 + 38 blocks go to
          pinned host memory every evaluation (through refdrop/forge_dit and host/flux_attention, as on Forge 2.0)
  use     the same install with Job.uses = [(reference, c)] (a reference recorded from another seed): every block's
          image-token outputs blend attention over [text; reference image] K/V

Floors, in the same rounds: "floor use" is off plus, per block, one extra SDPA of the image-token queries over
GPU-resident [text; reference image] K/V buffers (the text part copied in) and an in-place blend, nothing else: the
cost any RefDrop Use must pay. "floor record" is off plus one device copy of each block's image-token K/V into a
preallocated buffer.

The patch goes on a minimal fake of the hosts' UnetPatcher (model_options, a model function wrapper, conditioning
modifiers). The first record pass (fresh pinned memory, "cold") is timed first; then --repeats rounds of off, use and
record (warm) run interleaved and each ratio is the median of the per-round ratios to the round's off pass.

Run from the repository root:  python3 benchmarks/refdrop_flux_bench.py --steps 8
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flux_shaped
from flux_shaped import FluxShaped
from refdrop_bench_lib import ROOT, Lib, load_lib
from refdrop_bench_measure import drop_references
from refdrop_bench_runner import DTYPES, Run, make_values


def floor_handler(kind: str, bufs: list, n_layers: int, n_txt: int, c: float):
    """The floor of `kind` ('use' or 'record') as a flux_attention handler (see the module docstring)."""
    count = [0]

    def handler(q, k, v, pe, mask, _options, call_next):
        i = count[0] % n_layers
        count[0] += 1
        q, k = flux_shaped.apply_rope(q, k, pe)
        out = call_next(q, k, v, None, mask)
        kb, vb = bufs[i]
        if kind == "use":
            kb[:, :, :n_txt].copy_(k[:, :, :n_txt])
            vb[:, :, :n_txt].copy_(v[:, :, :n_txt])
            ref = flux_shaped.attention_function(q[:, :, n_txt:], kb, vb, q.shape[1])
            out[:, n_txt:].lerp_(ref, c)
        else:
            kb.copy_(k[:, :, n_txt:])
            vb.copy_(v[:, :, n_txt:])
        return out

    return handler


class FakeUnetPatcher:
    """The part of the hosts' UnetPatcher that forge_install.install uses on a DiT."""

    def __init__(self, model):
        self.model = SimpleNamespace(diffusion_model=model)
        self.model_options: dict[str, Any] = {"transformer_options": {}}

    def set_model_unet_function_wrapper(self, fn) -> None:
        self.model_options["model_function_wrapper"] = fn

    def add_conditioning_modifier(self, fn) -> None:
        self.model_options.setdefault("conditioning_modifiers", []).append(fn)


class Bench:
    def __init__(self, args: argparse.Namespace, lib: Lib):
        self.args, self.device, self.lib = args, torch.device(args.device), lib
        dtype = DTYPES[args.dtype]
        with torch.device("meta"):
            model = FluxShaped(hidden=args.hidden, heads=args.hidden // 128, double=args.double, single=args.single)
        model = model.to_empty(device=self.device).to(dtype).eval()
        g = torch.Generator(device=self.device).manual_seed(0)
        for mod in model.modules():
            for name, prm in mod.named_parameters(recurse=False):
                if name == "scale":
                    prm.fill_(1.0)
                elif prm.dim() == 2:
                    prm.normal_(0.0, 0.5 * prm.shape[1] ** -0.5, generator=g)
                else:
                    prm.zero_()
        self.model = model
        self.family = f"flux:{args.double}+{args.single}@{args.hidden}"  # the tag, as every lib version writes it
        self.layers = frozenset(tuple(x[:3]) for x in lib.rd.layer_table(self.family))
        lat_h, lat_w = args.height // 8, args.width // 8
        gc = torch.Generator().manual_seed(1)
        self.x0 = torch.randn(1, 16, lat_h, lat_w, generator=gc).to(self.device, dtype)
        self.x0_use = torch.randn(1, 16, lat_h, lat_w, generator=gc).to(self.device, dtype)
        self.context = torch.randn(1, 512, 4096, generator=gc).to(self.device, dtype)
        self.y = torch.randn(1, 768, generator=gc).to(self.device, dtype)
        self.guidance = torch.full((1,), 3.5, device=self.device)
        self.bufs: dict[str, list] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def floor(self, kind: str, steps: int, x0: torch.Tensor) -> torch.Tensor:
        n_txt, n_img = self.context.shape[1], (x0.shape[2] // 2) * (x0.shape[3] // 2)
        heads = self.args.hidden // 128
        n_layers = self.args.double + self.args.single
        if kind not in self.bufs:
            length = n_txt + n_img if kind == "use" else n_img
            shape = (1, heads, length, 128)
            make = torch.randn if kind == "use" else torch.empty
            self.bufs[kind] = [
                tuple(make(shape, device=self.device, dtype=x0.dtype) for _ in "kv") for _ in range(n_layers)
            ]
        handler = floor_handler(kind, self.bufs[kind], n_layers, n_txt, self.args.coefficient)
        with importlib.import_module("lib_imgcond.host.flux_attention").handling(self.model, handler):
            return self.sample(None, steps, x0)

    def sample(self, patcher: FakeUnetPatcher | None, steps: int, x0: torch.Tensor) -> torch.Tensor:
        opts = patcher.model_options if patcher else {}
        modifiers, wrapper = opts.get("conditioning_modifiers", []), opts.get("model_function_wrapper")
        sigmas = torch.linspace(1.0, 0.0, steps + 1)
        x = x0.clone()
        self.last_issue = 0.0
        for i in range(steps):
            t0 = time.perf_counter()
            sigma = sigmas[i : i + 1].to(self.device)
            for fn in modifiers:
                fn(None, x, sigma, None, None, 1.0, {}, 0)
            c = {"c_crossattn": self.context, "y": self.y, "guidance": self.guidance}
            c["transformer_options"] = {"cond_or_uncond": [0]}
            if wrapper is None:
                v = self.model(x, sigma, c["c_crossattn"], c["y"], c["guidance"])
            else:
                args = {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": [0]}
                v = wrapper(lambda xx, tt, **cc: self.model(xx, tt, cc["c_crossattn"], cc["y"], cc["guidance"]), args)
            x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * v
            self.last_issue += time.perf_counter() - t0
        return x

    def run_once(self, mode: str, steps: int, ref: Any = None) -> Run:
        lib = self.lib
        job = tracker = patcher = None
        if mode in ("use", "record"):
            values = make_values("Record" if mode == "record" else "Use", self.args.coefficient)
            job = lib.host.Job(values, self.family, self.layers, budget=0)
            if mode == "record":
                meta = {"width": self.args.width, "height": self.args.height}
                job.record = lib.reference.Reference("bench", self.family, meta)
            else:
                job.uses = [(ref, self.args.coefficient)]
            tracker = lib.patch.PassTracker("first", steps)
            tracker.schedule = [float(s) for s in torch.linspace(1.0, 0.0, steps + 1)]
            patcher = FakeUnetPatcher(self.model)
            lib.installer.install(patcher, job, tracker, None)
        self.sync()
        t0 = time.perf_counter()
        if mode.startswith("floor"):
            self.last_x = self.floor(mode.split()[-1], steps, self.x0_use)
        else:
            self.last_x = self.sample(patcher, steps, self.x0_use if mode == "use" else self.x0)
        recorded = lib.host.finish_record(job, {"first": tracker}, save_file=False) if mode == "record" else None
        self.sync()
        seconds = time.perf_counter() - t0
        if mode == "use":
            lib.host.release(job)
        return Run(seconds, self.last_issue, recorded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--coefficient", type=float, default=0.3)
    parser.add_argument("--hidden", type=int, default=3072, help="hidden size (shrink for CPU smoke tests)")
    parser.add_argument("--double", type=int, default=19)
    parser.add_argument("--single", type=int, default=38)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--profile-steps", type=int, default=0, help="also profile floor use and use for this many steps"
    )
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--lib", default=ROOT)
    args = parser.parse_args()
    lib = load_lib(args.lib)  # before anything imports lib_imgcond, so that --lib is the copy measured
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.dtype}, {args.width}x{args.height}, batch 1, ", end="")
    print(f"{args.steps} steps x {args.repeats} repeats; lib_imgcond from {lib.folder}", flush=True)
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "args": vars(args)}
    with torch.inference_mode():
        bench = Bench(args, lib)
        params = sum(p.numel() for p in bench.model.parameters())
        print(f"model: {params / 1e9:.2f} B params, family {bench.family}", flush=True)
        bench.run_once("off", 2)
        cold = bench.run_once("record", args.steps)
        ref = cold.recorded
        per_eval = ref.nbytes / args.steps
        results.update(reference_bytes=ref.nbytes, kv_bytes_per_step=per_eval, reference_pairs=len(ref))
        cold = cold._replace(recorded=None)
        bench.run_once("use", 2, ref)
        bench.run_once("floor use", 2)
        bench.run_once("floor record", 2)
        runs: dict[str, list[Run]] = {m: [] for m in ("off", "floor use", "use", "floor record", "record (warm)")}
        for _ in range(args.repeats):
            runs["off"].append(bench.run_once("off", args.steps))
            runs["floor use"].append(bench.run_once("floor use", args.steps))
            runs["use"].append(bench.run_once("use", args.steps, ref))
            runs["floor record"].append(bench.run_once("floor record", args.steps))
            drop_references(lib.library)
            ref = None
            run = bench.run_once("record", args.steps)
            ref = run.recorded
            runs["record (warm)"].append(run._replace(recorded=None))
            del run
        results["use_finite"] = bool(torch.isfinite(bench.last_x).all())
        profiles = {}
        if args.profile_steps and cuda:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            for mode in ("floor use", "use"):
                with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    bench.run_once(mode, args.profile_steps, ref)
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
                profiles[mode] = table
    off = runs["off"]
    rows = []

    def row(label: str, rs: list[Run], ratios: list[float]) -> None:
        ms = [1e3 * r.seconds / args.steps for r in rs]
        issue = statistics.median(1e3 * r.issue / args.steps for r in rs)
        med, ratio = statistics.median(ms), statistics.median(ratios)
        rows.append(
            {"mode": label, "ms_per_step": med, "runs_ms": ms, "ratio": ratio, "ratios": ratios, "host_issue_ms": issue}
        )

    row("off", off, [1.0] * len(off))
    off_med = statistics.median(r.seconds for r in off)
    row("record (cold)", [cold], [cold.seconds / off_med])
    for label in ("floor record", "record (warm)", "floor use", "use"):
        row(label, runs[label], [r.seconds / o.seconds for r, o in zip(runs[label], off, strict=True)])
    results["rows"] = rows
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "flux_results.json"), "w") as f:
            json.dump(results, f, indent=2)
    for mode, table in profiles.items():
        print(f"\nprofile {mode} ({args.profile_steps} steps), by CUDA time:\n{table}")
    gib = 2**30
    print(
        f"K/V recorded per step: {per_eval / gib:.2f} GiB ({results['reference_pairs']} pairs over {args.steps} steps)"
    )
    print("\n| mode | ms/step (median) | × off (median; per round) | runs ms/step | host issue ms/step |")
    print("|---|---|---|---|---|")
    for r in rows:
        runs_text = ", ".join(f"{m:.1f}" for m in r["runs_ms"])
        ratios = ", ".join(f"{x:.3f}" for x in r["ratios"])
        cells = [
            r["mode"],
            f"{r['ms_per_step']:.1f}",
            f"{r['ratio']:.3f} ({ratios})",
            runs_text,
            f"{r['host_issue_ms']:.1f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
