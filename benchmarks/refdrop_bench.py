"""Per-step cost of RefDrop's Forge patch on an SDXL-shaped UNet (1024×1024, batch 2 = cond + uncond).

Modes:
  off     no patch installed
  record  lib_imgcond.refdrop.forge_install.install with Job.record set: K/V of the cond row of all 70 blocks stay in
          GPU memory when they fit within --gpu-share of it (as the setting; the default), else go into host memory
          every evaluation (through the staging ring; page-locked in the background after the pass, which is
          waited for outside the timing and reported)
  use     the same install with Job.uses = [(reference, c)]: every block blends attention over the recorded K/V
  batch   (alone, not in "all") mode Batch, consistent batch, at batch --batch (default 4, so 8 rows: uncond + cond):
          every block's cond rows attend to a share --rate of each other's tokens; timed against the plain batch
  trajectory  a trajectory reference (Reference storage: Trajectory) recorded, then Use timed against off
          (refdrop_bench_trajectory.py; alone, not part of `all`)

Floors, in the same rounds: "floor use" is off plus, per self-attention layer, one extra SDPA of the cond row's queries
over GPU-resident reference K/V and an in-place blend, nothing else (no store, no lookups): the cost any RefDrop Use
must pay. "floor record" is off plus one device copy of each layer's cond-row K/V into a preallocated buffer.

The patch is installed through a minimal fake of Forge's UnetPatcher (model_options, set_model_replace_all,
add_conditioning_modifier); each step calls the conditioning modifiers once, then the model, like Forge's
sampling_function, then an Euler update. Each timed run is a whole sampling pass of --steps steps (record: a fresh
Reference, finalized inside the timing). The first record passes in the process ("cold": the staging ring and the
CUDA handles are new) are timed first; then --repeats rounds of off, floors, use and record ("warm") run
interleaved, and each ratio is the median of the per-round ratios to the round's off pass. "host issue" is the host
time spent issuing the steps' work: when it is close to the wall time the run is host-bound.

Run from the repository root:  python3 benchmarks/refdrop_bench.py --mode all --steps 20
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sdxl_shaped import SDXLShapedUNet, attention, estimate_flops, transformer_keys  # noqa: E402

rd: Any = None  # lib_imgcond.refdrop.layers, its store modules and its Forge adapter, imported by load_lib()
reference: Any = None
prefetch: Any = None
checks: Any = None
arena: Any = None
host: Any = None
installer: Any = None
patch: Any = None
library: Any = None
blocks: Any = None  # lib_imgcond.memory.host_blocks where the measured copy has it


def load_lib(folder: str) -> str:
    """Import lib_imgcond from ``folder`` (the repository root by default, or another copy to compare versions)."""
    global rd, reference, prefetch, checks, arena, host, installer, patch, library, blocks
    import importlib
    import logging

    sys.path.insert(0, os.path.abspath(folder))
    rd = importlib.import_module("lib_imgcond.refdrop.layers")
    reference = importlib.import_module("lib_imgcond.refdrop.reference")
    prefetch = importlib.import_module("lib_imgcond.refdrop.prefetch")
    checks = importlib.import_module("lib_imgcond.refdrop.checks")
    arena = importlib.import_module("lib_imgcond.memory.arena")
    host = importlib.import_module("lib_imgcond.refdrop.forge_refdrop")
    installer = importlib.import_module("lib_imgcond.refdrop.forge_install")
    patch = importlib.import_module("lib_imgcond.refdrop.forge_patch")
    library = importlib.import_module("lib_imgcond.refdrop.forge_library")
    blocks = sys.modules.get("lib_imgcond.memory.host_blocks")
    logging.getLogger("sd_webui_imgcond").setLevel(logging.WARNING)
    return os.path.dirname(os.path.dirname(os.path.abspath(host.__file__)))


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
    """The floor of `kind` ('use' or 'record') as an attn1 replace (see the module docstring); row 1 is cond."""

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
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        torch.manual_seed(0)
        with torch.device(self.device):
            self.model = SDXLShapedUNet(model_channels=args.channels).to(self.dtype).eval()
        self.keys = transformer_keys(self.model)
        self.layers = frozenset(tuple(x[:3]) for x in rd.layer_table("sdxl"))
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
        values = make_values("Record" if mode == "record" else "Use", self.args.coefficient)
        if self.args.record_every > 1:
            values["record_every"] = self.args.record_every
        budget = int(self.args.budget_gib * 2**30)
        job = host.Job(values, "sdxl", self.layers, budget=budget)
        if mode == "record":
            meta = {"width": self.args.width, "height": self.args.height}
            extra = {"precision": self.args.precision} if self.args.precision != "as computed" else {}
            gpu_for = getattr(getattr(host, "library", None), "gpu_for", None)  # absent from older copies (--lib)
            if gpu_for is not None and self.args.gpu_share > 0:
                shapes = [rd.layer_shape("sdxl", x, self.args.width, self.args.height) for x in self.layers]
                needed = checks.estimate_bytes(shapes, steps, 1, self.dtype.itemsize)
                extra["keep_on"] = gpu_for(self.device, needed, self.args.gpu_share / 100, "bench")
            job.record = reference.Reference("bench", "sdxl", meta, **extra)
        else:
            job.uses = [(ref, self.args.coefficient)]
        tracker = patch.PassTracker("first", steps)
        patcher = FakeUnetPatcher(self.keys)
        installer.install(patcher, job, tracker, attention)
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
            recorded = host.finish_record(job, {"first": tracker}, save_file=False)
        self.sync()
        seconds = time.perf_counter() - t0
        if mode == "record" and blocks is not None:  # the background page-locking of the recording, not timed
            blocks.idle()
            self.register_s.append(time.perf_counter() - t0 - seconds)
        return Run(seconds, self.last_issue, recorded)


DROP_S: list[float] = []  # seconds each drop of the recorded references took (unregistering and unmapping them)


def drop_references() -> None:
    """Drop the recorded references the library holds (callers let go of theirs first), timed."""
    t0 = time.perf_counter()
    library.REFERENCES.clear()
    gc.collect()
    DROP_S.append(time.perf_counter() - t0)


def empty_host_cache() -> bool:
    fn = getattr(torch._C, "_host_emptyCache", None) or getattr(torch._C, "_accelerator_emptyHostCache", None)
    if fn is None:
        return False
    fn()
    return True


def host_stats() -> dict[str, Any]:
    """torch's pinned host allocator counters (names vary by torch version), flattened."""
    try:
        stats = torch.cuda.host_memory_stats()
    except (AttributeError, RuntimeError):
        return {}
    return {k: (v if isinstance(v, int | float) else str(v)) for k, v in dict(stats).items()}


def checksum(t: torch.Tensor) -> str:
    t = t.double()
    return f"sum {t.sum().item():.6e} abs {t.abs().sum().item():.6e} finite {bool(torch.isfinite(t).all())}"


def reference_checksum(ref: Any, steps: int) -> str:
    keys = [k for k in ref if k.step in (0, steps // 2, steps - 1)]
    total = sum(ref.get(k)[i].double().sum().item() for k in keys for i in (0, 1))
    return f"{len(keys)} pairs, sum {total:.6e}"


@contextmanager
def labelled_store_calls():
    """Profiler labels around the store calls the patch makes (restored afterwards)."""
    patched = []

    def wrap(cls, name):
        orig = cls.__dict__[name]
        if isinstance(orig, property):

            def getter(self, _f=orig.fget):
                with torch.profiler.record_function(f"{cls.__name__}.{name}"):
                    return _f(self)

            setattr(cls, name, property(getter))
        else:

            def fn(*a, _f=orig, **kw):
                with torch.profiler.record_function(f"{cls.__name__}.{name}"):
                    return _f(*a, **kw)

            setattr(cls, name, fn)
        patched.append((cls, name, orig))

    patch = sys.modules["lib_imgcond.refdrop.forge_patch"]
    for cls, name in [
        (reference.Reference, "put"),
        (reference.Reference, "put_many"),
        (reference.Reference, "get"),
        (reference.Reference, "nbytes"),
        (prefetch.Prefetcher, "fetch"),
        (prefetch.Prefetcher, "get"),
        (patch.Runner, "attend"),  # the whole per-layer work of the patch (the host's attention included)
        (patch.Runner, "flush"),
        (patch.ReferenceSource, "get"),
        (patch.ReferenceSource, "prepare"),
    ]:
        wrap(cls, name)
    try:
        yield
    finally:
        for cls, name, orig in patched:
            setattr(cls, name, orig)


def profile(bench: Bench, mode: str, ref: Any, steps: int, out_dir: str | None) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if bench.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with labelled_store_calls(), torch.profiler.profile(activities=activities) as prof:
        bench.run_once(mode, steps, ref)
    events = prof.key_averages()
    cpu_table = events.table(sort_by="self_cpu_time_total", row_limit=25)
    dev_table = ""
    if len(activities) > 1:
        for key in ("self_device_time_total", "self_cuda_time_total"):
            try:
                dev_table = events.table(sort_by=key, row_limit=25)
                break
            except (AttributeError, KeyError, ValueError):
                continue
    if out_dir:
        with open(os.path.join(out_dir, f"profile_{mode}.txt"), "w") as f:
            f.write(f"{mode}: {steps} steps\n\nby self CPU time\n{cpu_table}\n\nby self device time\n{dev_table}\n")
    lines = []
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]:
        per_step = e.self_cpu_time_total / 1e3 / steps
        lines.append(f"  {e.key[:40]:40s} calls {e.count:6d}  self CPU {per_step:8.2f} ms/step")
    prefixes = ("Reference.", "Prefetcher.", "Runner.", "ReferenceSource.")
    labels = [e for e in events if e.key.startswith(prefixes) and e.cpu_time_total > 0]  # not the CUDA-side copies
    for e in labels:
        lines.append(f"  [{e.key}] calls {e.count:6d}  CPU total {e.cpu_time_total / 1e3 / steps:8.2f} ms/step")
    return "\n".join(lines)


def bandwidth(device: torch.device) -> dict[str, float]:
    """Pinned host↔device copy rates for context (GB/s)."""
    n = 512 * 2**20
    host_buf = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    out = {}
    for name, dst, src in (("h2d", dev, host_buf), ("d2h", host_buf, dev)):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        out[name] = 5 * n / (time.perf_counter() - t0) / 1e9
    return out


def batch_mode(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Mode Batch (consistent batch) at batch --batch (2·batch rows: uncond then cond), timed against the same plain
    batch: per round one plain pass and one consistent pass, the ratio the median of the per-round ratios."""
    b, device = args.batch, bench.device
    g = torch.Generator(device="cpu").manual_seed(3)
    x0 = torch.randn(b, 4, args.height // 8, args.width // 8, generator=g).to(device)
    context = torch.cat([bench.context[0:1].expand(b, -1, -1), bench.context[1:2].expand(b, -1, -1)])
    y = torch.cat([bench.y[0:1].expand(b, -1), bench.y[1:2].expand(b, -1)])
    values = {**make_values("Batch", args.coefficient), "image": None, "rate": args.rate, "prompt_lines": ""}
    values["batch_sets"] = "each batch its own set"

    def one(on: bool) -> float:
        patcher = None
        if on:
            job = host.Job(values, "sdxl", bench.layers, batch_seed=1)
            patcher = FakeUnetPatcher(bench.keys)
            installer.install(patcher, job, patch.PassTracker("first", args.steps), attention)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("off", "record", "use", "all", "batch", "trajectory"), default="all")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed sampling pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per mode (medians reported)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--coefficient", type=float, default=0.3)
    parser.add_argument("--budget-gib", type=float, default=16.0, help="RAM budget, as the setting (default 16)")
    parser.add_argument(
        "--gpu-share", type=float, default=25.0, help="%% of GPU memory recordings may stay in, as the setting (0: RAM)"
    )
    parser.add_argument(
        "--precision", choices=("as computed", "fp16", "fp8"), default="as computed", help="storage of recorded K/V"
    )
    parser.add_argument("--record-every", type=int, default=1, help="Record: keep every k-th evaluation")
    parser.add_argument("--channels", type=int, default=320, help="model channels (shrink for CPU smoke tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile-steps", type=int, default=0, help="also profile off/use/record for this many steps")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for results.json and profiles")
    parser.add_argument(
        "--fuse-below", type=int, default=None, help="set forge_patch.FUSE_BELOW_TOKENS (default: the library's)"
    )
    parser.add_argument("--batch", type=int, default=4, help="mode batch: images per batch (default 4)")
    parser.add_argument("--rate", type=float, default=0.5, help="mode batch: shared token rate r (default 0.5)")
    parser.add_argument("--lib", default=ROOT, help="folder holding the lib_imgcond to measure (default: this repo)")
    args = parser.parse_args()
    lib = load_lib(args.lib)
    if args.fuse_below is not None:
        sys.modules["lib_imgcond.refdrop.forge_patch"].FUSE_BELOW_TOKENS = args.fuse_below

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if cuda else "cpu"
    size = f"{args.width}x{args.height}, storage {args.precision}, record every {args.record_every}"
    print(f"device {name}, torch {torch.__version__}, {args.dtype}, {size}, batch 2, ", end="")
    print(f"{args.steps} steps x {args.repeats} repeats; lib_imgcond from {lib}", flush=True)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
    with torch.inference_mode():
        bench = Bench(args)
        flops = estimate_flops(bench.model, args.height, args.width, 2)
        print(f"model: {sum(p.numel() for p in bench.model.parameters()) / 1e9:.2f} B params, ", end="")
        print(f"{flops / 1e12:.1f} TFLOP per step (matmul/conv/attention)", flush=True)
        results: dict[str, Any] = {"device": name, "torch": torch.__version__, "args": vars(args)}
        if args.mode == "batch":
            report_batch(batch_mode(bench, args), args.out, results)
            return
        if cuda:
            results["copy_GBps"] = bandwidth(bench.device)
            print("pinned copy GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in results["copy_GBps"].items()))

        if args.mode == "trajectory":  # record a trajectory reference, then time its Use against off
            import refdrop_bench_trajectory

            refdrop_bench_trajectory.run(bench, args, sys.modules[__name__])
            return
        modes = ("off", "record", "use") if args.mode == "all" else (args.mode,)
        warm = max(2, args.steps // 10)
        bench.run_once("off", warm)  # cuDNN/cuBLAS handles, kernel selection
        floors = [f"floor {m}" for m in ("use", "record") if m in modes]
        for mode in floors:
            bench.run_once(mode, warm)  # allocates its buffers
        rows: list[tuple[str, float, list[float], float, float, str]] = []

        def report(label: str, runs: list[Run], ratio: float, ratios: list[float] = ()) -> None:
            ms = [1e3 * r.seconds / args.steps for r in runs]
            med = statistics.median(ms)
            issue = statistics.median(1e3 * r.issue / args.steps for r in runs)
            spread = f"{min(ratios):.3f}-{max(ratios):.3f}" if ratios else ""
            rows.append((label, med, ms, issue, ratio, spread))
            runs_text = ", ".join(f"{m:.2f}" for m in ms)
            print(f"{label:14s} {med:8.2f} ms/step x{ratio:.3f} [{spread}] (host issue {issue:6.2f})  runs {runs_text}")

        ref = None
        checks: dict[str, str] = {}
        cold: list[Run] = []
        if "record" in modes or "use" in modes:
            # the first record pass in the process sets up the staging ring ("cold"); later ones count as cold too
            # after the host allocator's cache is emptied (where torch allows it)
            for i in range(args.repeats if "record" in modes else 1):
                ref = None
                drop_references()
                emptied = empty_host_cache() if (cuda and i > 0) else (i == 0)
                run = bench.run_once("record", args.steps)
                ref = run.recorded
                if emptied:
                    cold.append(run._replace(recorded=None))
                del run  # keep no reference alive but `ref`
            results["cold_runs"] = len(cold)
            results["reference_bytes"] = ref.nbytes
            results["reference_pairs"] = len(ref)
            results["host_stats_after_record"] = host_stats() if cuda else {}
            checks["reference"] = reference_checksum(ref, args.steps)
            if "use" in modes:
                bench.run_once("use", warm, ref)
        # interleaved rounds (off, use, record), so that drift in the host's speed hits every mode alike; ratios are
        # taken within a round.
        by_mode: dict[str, list[Run]] = {"off": [], "use": [], "record (warm)": [], **{m: [] for m in floors}}
        for _ in range(args.repeats):
            by_mode["off"].append(bench.run_once("off", args.steps))
            checks["off latent"] = checksum(bench.last_x)
            for mode in floors:
                by_mode[mode].append(bench.run_once(mode, args.steps))
            if "use" in modes:
                by_mode["use"].append(bench.run_once("use", args.steps, ref))
                checks["use latent"] = checksum(bench.last_x)
            if "record" in modes:
                ref = None
                drop_references()
                run = bench.run_once("record", args.steps)
                ref = run.recorded
                by_mode["record (warm)"].append(run._replace(recorded=None))
                del run
        results["checksums"] = checks
        off_runs = by_mode["off"]
        report("off", off_runs, 1.0)
        off_med = statistics.median(r.seconds for r in off_runs)
        if cold and "record" in modes:
            report("record (cold)", cold, statistics.median(r.seconds for r in cold) / off_med)
        for label in ("floor record", "record (warm)", "floor use", "use"):
            if by_mode.get(label):
                ratios = [r.seconds / o.seconds for r, o in zip(by_mode[label], off_runs, strict=True)]
                report(label, by_mode[label], statistics.median(ratios), ratios)

        profiles = {}
        if args.profile_steps:
            for mode in ("off", "use", "record"):
                if mode in modes:
                    if mode == "record":
                        ref = None
                        drop_references()
                    profiles[mode] = profile(bench, mode, ref, args.profile_steps, args.out)

    results["register_s"] = bench.register_s
    results["drop_s"] = DROP_S
    results["rows"] = [
        {"mode": m, "ms_per_step": med, "runs_ms": ms, "ratio": ratio, "ratio_spread": sp, "host_issue_ms_per_step": i}
        for m, med, ms, i, ratio, sp in rows
    ]
    if args.out:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    for mode, text in profiles.items():
        print(f"\nprofile {mode} ({args.profile_steps} steps), top self-CPU ops:\n{text}")
    if "reference_bytes" in results:
        size = arena.format_bytes(results["reference_bytes"])
        print(f"\nreference: {results['reference_pairs']} K/V pairs, {size} of tensors")
        hs = results["host_stats_after_record"]
        shown = {k: v for k, v in hs.items() if "bytes.current" in k or ("alloc" in k.lower() and "time" in k.lower())}
        for k, v in shown.items():
            print(f"  host allocator {k}: {arena.format_bytes(v) if 'bytes' in k else v}")
    if bench.register_s:
        reg = bench.register_s
        print(f"background page-locking after each record pass: {min(reg):.3f}-{max(reg):.3f} s", end="")
        print(f" ({blocks.locked_bytes() / 2**30:.2f} GiB locked now)")
    if DROP_S:
        print(f"dropping the recorded reference (not timed): {min(DROP_S):.3f}-{max(DROP_S):.3f} s")
    for k, v in checks.items():
        print(f"checksum {k}: {v}")
    print(
        f"\n| mode | ms/step (median of {args.repeats}) | × off | spread | host issue ms/step |\n|---|---|---|---|---|"
    )
    for m, med, _, issue, ratio, spread in rows:
        print(f"| {m} | {med:.2f} | {ratio:.3f} | {spread} | {issue:.2f} |")


if __name__ == "__main__":
    main()
