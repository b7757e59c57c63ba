"""Per-step cost of RefDrop on Neo's newer DiTs: a Z-Image-shaped (6.2 B) or Qwen-Image-shaped (20.4 B) transformer
(dit_shaped.py, random weights) at batch 1, through the project's own attention site for that family
(lib_imgcond/host/sites/, found by the family key as in a WebUI) and forge_install.install on a minimal fake of the
hosts' UnetPatcher.

Modes, each a whole sampling pass of --steps Euler steps:
  off           nothing installed
  record        Record: every block's image-token K/V kept (the library's storage plan: GPU-kept when it fits)
  use           Use of a reference recorded from another seed at c = --coefficient: every block's image-token outputs
                blend attention over [this call's context tokens; the reference's image tokens]
  floor record  off plus one device copy of each block's image-token K/V into a preallocated buffer
  floor use     off plus, per block, one extra SDPA of the image-token queries over GPU-resident [context; reference
                image] K/V and an in-place blend: the cost any RefDrop Use must pay
Rounds run the modes in rotated order (no mode always follows another); each ratio is to the same round's off pass,
reported as the median with the min–max spread over the rounds. The time of a pass includes finishing the record.

Run from the repository root:  python3 benchmarks/refdrop_dit_bench.py --shape zimage --steps 8
CPU smoke test:                python3 benchmarks/refdrop_dit_bench.py --shape zimage --tiny --steps 2 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dit_shaped
from refdrop_bench_lib import ROOT, load_lib
from refdrop_bench_measure import drop_references
from refdrop_bench_runner import DTYPES, make_values

HOST_MODULES = {"zimage": "backend.nn.lumina", "qwen_image": "backend.nn.qwen"}  # what each family's site swaps
TINY = {"zimage": dict(dim=256, heads=2, layers=3, refiners=1, ffn=512, cap_dim=64),
        "qwen_image": dict(dim=256, heads=2, blocks=3, ffn=512, txt_dim=64)}  # fmt: skip
CONTEXT = {"zimage": (96, 2560), "qwen_image": (96, 3584)}  # prompt tokens, text feature width
MODES = ("off", "floor record", "record", "floor use", "use")


def stand_in(name: str) -> None:
    """Make `name` (the host module the family's site swaps) resolve to dit_shaped, whose blocks call it."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    sys.modules[name] = dit_shaped
    for cls in (dit_shaped.JointAttention, dit_shaped.DoubleAttention):  # the sites check whose class they hook
        cls.__module__ = name


class FakeUnetPatcher:
    def __init__(self, model):
        self.model = types.SimpleNamespace(diffusion_model=model)
        self.model_options: dict[str, Any] = {"transformer_options": {}}

    def set_model_unet_function_wrapper(self, fn) -> None:
        self.model_options["model_function_wrapper"] = fn

    def add_conditioning_modifier(self, fn) -> None:
        self.model_options.setdefault("conditioning_modifiers", []).append(fn)


class Bench:
    def __init__(self, args, lib, sites, dit_attention, families):
        self.args, self.lib, self.device = args, lib, torch.device(args.device)
        dtype = DTYPES[args.dtype]
        kwargs = TINY[args.shape] if args.tiny else {}
        with torch.device("meta"):
            model = dit_shaped.SHAPES[args.shape](**kwargs)
        model = model.to_empty(device=self.device).to(dtype).eval()
        g = torch.Generator(device=self.device).manual_seed(0)
        for name, prm in model.named_parameters():
            if name.endswith("scale"):
                prm.fill_(1.0)
            elif prm.dim() == 2:
                prm.normal_(0.0, 0.5 * prm.shape[1] ** -0.5, generator=g)
            else:
                prm.zero_()
        self.model, self.site, self.attn = model, sites.site(args.shape), dit_attention
        if self.site is None:
            raise SystemExit(f"this lib_imgcond has no RefDrop attention site for {args.shape}")
        self.family = families.dit_family(args.shape, dit_attention.counts(self.site, model), self.site.channels(model))
        self.groups = families.DIT[args.shape].groups
        self.layers = frozenset(tuple(x[:3]) for x in lib.rd.layer_table(self.family))
        gc = torch.Generator().manual_seed(1)
        lat = (1, model.channels, args.height // 8, args.width // 8)
        self.x0, self.x0_use = (torch.randn(lat, generator=gc).to(self.device, dtype) for _ in "ab")
        n_ctx, width = CONTEXT[args.shape] if not args.tiny else (CONTEXT[args.shape][0], 64)
        self.context = torch.randn(1, n_ctx, width, generator=gc).to(self.device, dtype)
        self.bufs: dict = {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def floor_handler(self, kind: str):
        model, c, bufs = self.model, self.args.coefficient, self.bufs.setdefault(kind, {})

        def handler(key, q, k, v, heads, mask, kw, original):
            out = original(q, k, v, heads, mask=mask, **kw)
            q4, k4, v4 = (q, k, v) if kw.get("skip_reshape") else (t.unflatten(-1, (heads, -1)).transpose(1, 2)
                                                                   for t in (q, k, v))  # fmt: skip
            start, end = self.attn.image_span(self.site, model, self.cur_x, q4.shape[2], self.calling.inputs)
            if key not in bufs:  # made in the warm-up pass, outside the timing
                make = torch.randn_like if kind == "use" else torch.empty_like
                bufs[key] = tuple(make(t) if kind == "use" else make(t[:, :, start:end]) for t in (k4, v4))
            kb, vb = bufs[key]
            if kind == "use":
                for buf, t in ((kb, k4), (vb, v4)):  # this call's context around the reference image tokens
                    buf[:, :, :start].copy_(t[:, :, :start])
                    buf[:, :, end:].copy_(t[:, :, end:])
                ref = original(q4[:, :, start:end], kb, vb, heads, None, skip_reshape=True)
                out[:, start:end].lerp_(ref, c)
            else:
                kb.copy_(k4[:, :, start:end])
                vb.copy_(v4[:, :, start:end])
            return out

        return handler

    def sample(self, patcher, steps: int, x0, handler=None):
        opts = patcher.model_options if patcher else {}
        modifiers, wrapper = opts.get("conditioning_modifiers", []), opts.get("model_function_wrapper")
        sigmas = torch.linspace(1.0, 0.0, steps + 1)
        x = x0.clone()
        for i in range(steps):
            sigma = sigmas[i : i + 1].to(self.device)
            for fn in modifiers:
                fn(None, x, sigma, None, None, 1.0, {}, 0)
            c = {"c_crossattn": self.context, "transformer_options": {"cond_or_uncond": [0]}}
            self.cur_x = x
            if handler is not None:
                with self.attn.handling(self.site, self.model, self.groups, handler) as calling:
                    self.calling = calling
                    v = self.model(x, sigma, self.context)
            elif wrapper is None:
                v = self.model(x, sigma, self.context)
            else:
                args = {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": [0]}
                v = wrapper(lambda xx, tt, **cc: self.model(xx, tt, cc["c_crossattn"]), args)
            x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * v
        return x

    def run_once(self, mode: str, steps: int, ref=None):
        lib, job, tracker, patcher = self.lib, None, None, None
        if mode in ("use", "record"):
            job = lib.host.Job(make_values("Record" if mode == "record" else "Use", self.args.coefficient),
                               self.family, self.layers, budget=0)  # fmt: skip
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
        handler = self.floor_handler(mode.split()[-1]) if mode.startswith("floor") else None
        self.last_x = self.sample(patcher, steps, self.x0 if mode == "record" else self.x0_use, handler)
        recorded = lib.host.finish_record(job, {"first": tracker}, save_file=False) if mode == "record" else None
        self.sync()
        seconds = time.perf_counter() - t0
        if mode == "use":
            lib.host.release(job)
        return seconds, recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=tuple(dit_shaped.SHAPES), default="zimage")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--coefficient", type=float, default=0.3)
    parser.add_argument("--tiny", action="store_true", help="a few narrow blocks (CPU smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--lib", default=ROOT)
    args = parser.parse_args()
    lib = load_lib(args.lib)
    stand_in(HOST_MODULES[args.shape])
    import importlib

    sites = importlib.import_module("lib_imgcond.host.sites.registry")
    dit_attention = importlib.import_module("lib_imgcond.host.dit_attention")
    families = importlib.import_module("lib_imgcond.refdrop.families")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "args": vars(args)}
    with torch.inference_mode():
        bench = Bench(args, lib, sites, dit_attention, families)
        params = sum(p.numel() for p in bench.model.parameters())
        print(f"device {name}, torch {torch.__version__}, {args.dtype}, {args.width}x{args.height}, batch 1, "
              f"{args.steps} steps x {args.repeats} rounds; {params / 1e9:.2f} B params, family {bench.family}",
              flush=True)  # fmt: skip
        bench.run_once("off", 1)
        _, ref = bench.run_once("record", args.steps)
        results.update(reference_bytes=ref.nbytes, kv_bytes_per_step=ref.nbytes / args.steps)
        for mode in ("use", "floor use", "floor record"):
            bench.run_once(mode, 1, ref)
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(args.repeats):
            for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                if mode == "record":
                    drop_references(lib.library)
                    ref = None
                seconds, recorded = bench.run_once(mode, args.steps, ref)
                ref = recorded if recorded is not None else ref
                times[mode].append(seconds)
        results["finite"] = bool(torch.isfinite(bench.last_x).all())
    rows = []
    for mode in MODES:
        ratios = [t / o for t, o in zip(times[mode], times["off"], strict=True)]
        ms = [1e3 * t / args.steps for t in times[mode]]
        rows.append({"mode": mode, "ms_per_step": statistics.median(ms), "ratio": statistics.median(ratios),
                     "spread": [min(ratios), max(ratios)], "ratios": ratios})  # fmt: skip
    results["rows"] = rows
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"dit_{args.shape}_results.json"), "w") as f:
            json.dump(results, f, indent=2)
    print(f"K/V recorded per step: {results['kv_bytes_per_step'] / 2**30:.3f} GiB; finite: {results['finite']}")
    print("| mode | ms/step (median) | × off (median) | spread (min–max) |\n|---|---|---|---|")
    for row in rows:
        lo, hi = row["spread"]
        print(f"| {row['mode']} | {row['ms_per_step']:.1f} | {row['ratio']:.3f} | {lo:.3f}–{hi:.3f} |")


if __name__ == "__main__":
    main()
