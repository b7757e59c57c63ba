"""The RefDrop benchmark's set-up and timed passes (refdrop_bench.py): the SDXL-shaped UNet and its inputs, a minimal
fake of Forge's UnetPatcher that forge_install.install patches, the floor replaces, and `Bench.run_once`, which times
one whole sampling pass of a mode (off, record, use, floor use, floor record).

The lib_imgcond under test comes in as the `Lib` that refdrop_bench_lib.load_lib returned; this module imports none.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, NamedTuple

import torch
from refdrop_bench_lib import Lib
from sdxl_shaped import SDXLShapedUNet, attention, transformer_keys

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class FakeUnetPatcher:
    """The part of Forge's UnetPatcher that forge_install.install uses."""

    def __init__(self, keys: list[tuple[str, int, int]]):
        self.keys = keys
        self.model_options: dict[str, Any] = {"transformer_options": {}}

    def set_model_replace_all(self, fn, name: str) -> None:
        replaces = self.model_options["transformer_options"].setdefault("patches_replace", {}).setdefault(name, {})
        for key in self.keys:
            replaces[key] = fn

    def add_conditioning_modifier(self, fn) -> None:
        self.model_options.setdefault("conditioning_modifiers", []).append(fn)


def floor_replace(kind: str, bufs: dict, c: float):
    """The floor of `kind` ('use' or 'record') as an attn1 replace (see refdrop_bench.py's docstring); row 1 is cond."""

    def attn1(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        out = attention(q, k, v, heads)
        key = (extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])
        if key not in bufs:  # made in the warm-up pass, outside the timing
            bufs[key] = tuple((torch.randn_like if kind == "use" else torch.empty_like)(t[1:2]) for t in (k, v))
        kb, vb = bufs[key]
        if kind == "use":
            out[1:2].lerp_(attention(q[1:2], kb, vb, heads), c)
        else:
            kb.copy_(k[1:2])
            vb.copy_(v[1:2])
        return out

    return attn1


def make_values(mode: str, coefficient: float) -> dict[str, Any]:
    return {
        "enabled": True,
        "mode": mode,
        "reference": "bench",
        "coefficient": coefficient,
        "more_references": "",
        "layers": "all",
        "batch_item": 0,
        "uncond": False,
        "start": 0.0,
        "end": 1.0,
        "hires": False,
        "save": False,
    }


class Run(NamedTuple):
    seconds: float  # wall time of the pass, GPU work included
    issue: float  # host time spent issuing the steps (excludes the per-step wait on the GPU)
    recorded: Any  # the finished Reference of a record pass, else None


class Bench:
    def __init__(self, args: argparse.Namespace, lib: Lib):
        self.args = args
        self.lib = lib
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        torch.manual_seed(0)
        with torch.device(self.device):
            self.model = SDXLShapedUNet(model_channels=args.channels).to(self.dtype).eval()
        self.keys = transformer_keys(self.model)
        self.layers = frozenset(tuple(x[:3]) for x in lib.rd.layer_table("sdxl"))
        assert set(self.keys) == set(self.layers), "model blocks must match lib_imgcond's SDXL layer table"
        lat_h, lat_w = args.height // 8, args.width // 8
        g = torch.Generator(device="cpu").manual_seed(1)
        self.x0 = torch.randn(1, 4, lat_h, lat_w, generator=g).to(self.device)
        self.x0_use = torch.randn(1, 4, lat_h, lat_w, generator=g).to(self.device)  # Use: another seed
        self.context = torch.randn(2, 77, 2048, generator=g).to(self.device, self.dtype)
        self.y = torch.randn(2, 2816, generator=g).to(self.device, self.dtype)
        self.bufs: dict[str, dict] = {}
        self.register_s: list[float] = []  # per record pass: its background page-locking, after the pass

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def sample(self, patcher: FakeUnetPatcher | None, steps: int, x0: torch.Tensor) -> torch.Tensor:
        """One sampling pass: per step, Forge's conditioning modifiers, one batch-2 CFG evaluation, an Euler update."""
        opts = patcher.model_options if patcher else {"transformer_options": {}}
        modifiers = opts.get("conditioning_modifiers", [])
        x = x0.clone()
        sigmas = torch.linspace(14.6, 0.03, steps + 1).to(self.device)
        self.last_issue = 0.0
        for i in range(steps):
            sigma = sigmas[i : i + 1]
            float(sigma)  # a k-diffusion sampler reads sigma on the host every step
            t0 = time.perf_counter()
            for fn in modifiers:
                fn(None, x, sigma, None, None, 7.0, {}, 0)
            topts = dict(opts["transformer_options"])
            topts["cond_or_uncond"] = [1, 0]  # row 0 uncond, row 1 cond, as Forge batches them
            topts["sigmas"] = sigma.expand(2)
            out = self.model(torch.cat([x, x]), sigma.expand(2) * 70.0, self.context, self.y, topts)
            uncond, cond = out.chunk(2)
            denoised = uncond + 7.0 * (cond - uncond)
            x = x + (denoised - x) * (sigmas[i + 1] - sigma) / sigma
            self.last_issue += time.perf_counter() - t0  # host time to issue the step (no wait for the GPU)
        return x

    def patched(self, mode: str, steps: int, ref: Any):
        lib = self.lib
        values = make_values("Record" if mode == "record" else "Use", self.args.coefficient)
        if self.args.record_every > 1:
            values["record_every"] = self.args.record_every
        budget = int(self.args.budget_gib * 2**30)
        job = lib.host.Job(values, "sdxl", self.layers, budget=budget)
        if mode == "record":
            meta = {"width": self.args.width, "height": self.args.height}
            extra = {"precision": self.args.precision} if self.args.precision != "as computed" else {}
            gpu_for = getattr(getattr(lib.host, "library", None), "gpu_for", None)  # absent from older copies (--lib)
            if gpu_for is not None and self.args.gpu_share > 0:
                shapes = [lib.rd.layer_shape("sdxl", x, self.args.width, self.args.height) for x in self.layers]
                needed = lib.checks.estimate_bytes(shapes, steps, 1, self.dtype.itemsize)
                extra["keep_on"] = gpu_for(self.device, needed, self.args.gpu_share / 100, "bench")
            job.record = lib.reference.Reference("bench", "sdxl", meta, **extra)
        else:
            job.uses = [(ref, self.args.coefficient)]
        tracker = lib.patch.PassTracker("first", steps)
        patcher = FakeUnetPatcher(self.keys)
        lib.installer.install(patcher, job, tracker, attention)
        return job, tracker, patcher

    def floor_patcher(self, kind: str) -> FakeUnetPatcher:
        patcher = FakeUnetPatcher(self.keys)
        bufs = self.bufs.setdefault(kind, {})
        patcher.set_model_replace_all(floor_replace(kind, bufs, self.args.coefficient), "attn1")
        return patcher

    def run_once(self, mode: str, steps: int, ref: Any = None) -> Run:
        """One whole pass timed, patch set-up outside the timing; the final latent goes to self.last_x."""
        job = tracker = patcher = None
        if mode.startswith("floor"):
            patcher = self.floor_patcher(mode.split()[-1])
        elif mode != "off":
            job, tracker, patcher = self.patched(mode, steps, ref)
        self.sync()
        t0 = time.perf_counter()
        self.last_x = self.sample(patcher, steps, self.x0 if mode in ("off", "record", "floor record") else self.x0_use)
        recorded = None
        if mode == "record":
            recorded = self.lib.host.finish_record(job, {"first": tracker}, save_file=False)
        self.sync()
        seconds = time.perf_counter() - t0
        if mode == "record" and self.lib.blocks is not None:  # the background page-locking of the recording, not timed
            self.lib.blocks.idle()
            self.register_s.append(time.perf_counter() - t0 - seconds)
        return Run(seconds, self.last_issue, recorded)
