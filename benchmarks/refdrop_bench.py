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
import json
import os
import statistics
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# None of these imports lib_imgcond: main() has load_lib import it first, from --lib (see refdrop_bench_lib.py).
import refdrop_bench_trajectory
from refdrop_bench_batch import batch_mode, report_batch
from refdrop_bench_lib import ROOT, load_lib
from refdrop_bench_measure import (
    bandwidth,
    checksum,
    drop_references,
    empty_host_cache,
    host_stats,
    profile,
    reference_checksum,
)
from refdrop_bench_runner import DTYPES, Bench, Run
from sdxl_shaped import estimate_flops


def parse_args() -> argparse.Namespace:
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
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # First thing: nothing may import lib_imgcond before load_lib has put --lib first on sys.path, or that other copy
    # would be the one measured (Python imports a package once per process). The library goes on from here as `lib`.
    lib = load_lib(args.lib)
    if args.fuse_below is not None:
        lib.patch.FUSE_BELOW_TOKENS = args.fuse_below

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if cuda else "cpu"
    size = f"{args.width}x{args.height}, storage {args.precision}, record every {args.record_every}"
    print(f"device {name}, torch {torch.__version__}, {args.dtype}, {size}, batch 2, ", end="")
    print(f"{args.steps} steps x {args.repeats} repeats; lib_imgcond from {lib.folder}", flush=True)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
    with torch.inference_mode():
        bench = Bench(args, lib)
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
            refdrop_bench_trajectory.run(bench, args, lib)
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
        drop_s: list[float] = []  # seconds each drop of the recorded references took (unregistering, unmapping them)
        checks: dict[str, str] = {}
        cold: list[Run] = []
        if "record" in modes or "use" in modes:
            # the first record pass in the process sets up the staging ring ("cold"); later ones count as cold too
            # after the host allocator's cache is emptied (where torch allows it)
            for i in range(args.repeats if "record" in modes else 1):
                ref = None
                drop_s.append(drop_references(lib.library))
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
                drop_s.append(drop_references(lib.library))
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
                        drop_s.append(drop_references(lib.library))
                    profiles[mode] = profile(bench, mode, ref, args.profile_steps, args.out)

    results["register_s"] = bench.register_s
    results["drop_s"] = drop_s
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
        size = lib.arena.format_bytes(results["reference_bytes"])
        print(f"\nreference: {results['reference_pairs']} K/V pairs, {size} of tensors")
        hs = results["host_stats_after_record"]
        shown = {k: v for k, v in hs.items() if "bytes.current" in k or ("alloc" in k.lower() and "time" in k.lower())}
        for k, v in shown.items():
            print(f"  host allocator {k}: {lib.arena.format_bytes(v) if 'bytes' in k else v}")
    if bench.register_s:
        reg = bench.register_s
        print(f"background page-locking after each record pass: {min(reg):.3f}-{max(reg):.3f} s", end="")
        print(f" ({lib.blocks.locked_bytes() / 2**30:.2f} GiB locked now)")
    if drop_s:
        print(f"dropping the recorded reference (not timed): {min(drop_s):.3f}-{max(drop_s):.3f} s")
    for k, v in checks.items():
        print(f"checksum {k}: {v}")
    print(
        f"\n| mode | ms/step (median of {args.repeats}) | × off | spread | host issue ms/step |\n|---|---|---|---|---|"
    )
    for m, med, _, issue, ratio, spread in rows:
        print(f"| {m} | {med:.2f} | {ratio:.3f} | {spread} | {issue:.2f} |")


if __name__ == "__main__":
    main()
