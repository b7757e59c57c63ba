"""Size and round-trip error of RefDrop's storage precisions and of a step subset (`record_every`).

Sizes: the exact bytes of the K/V one Record stores (cond branch, all layers, Euler: one evaluation per step), from
the layer shapes, for each precision and for record_every 1 and 2. Error: K/V tensors of an SD1.5-shaped recording
(random: unit-variance Gaussian, and heavy-tailed Student-t with 3 degrees of freedom, both scaled like projected
attention K/V) go through a Reference at each precision and come back in fp32; the table gives the largest absolute
error, that error relative to the tensor's largest magnitude, and the mean absolute error relative to the mean
magnitude. With --file PATH the error is measured on the K/V of a saved fp32 reference instead.

Run from the repository root (CPU is enough; --device cuda measures the same on a GPU):
  python3 benchmarks/refdrop_storage.py --steps 20
  python3 benchmarks/refdrop_storage.py --file models/imgcond/refdrop/hero.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib_imgcond.memory.arena import format_bytes
from lib_imgcond.refdrop import layers as rd
from lib_imgcond.refdrop import precision as prec
from lib_imgcond.refdrop.checks import estimate_bytes
from lib_imgcond.refdrop.file_format import load_reference
from lib_imgcond.refdrop.reference import Reference, RefKey

SRC_BYTES = {"sd15": 4, "sdxl": 2}  # fp32 SD1.5 (CPU), fp16 SDXL (GPU)


def sizes(steps: int) -> list[str]:
    rows = ["| model, size | as computed | fp16 | fp8 | fp8, record_every 2 |", "|---|---|---|---|---|"]
    for family, side in (("sd15", 512), ("sdxl", 1024)):
        shapes = [rd.layer_shape(family, tuple(x[:3]), side, side) for x in rd.layer_table(family)]
        src = SRC_BYTES[family]
        cells = []
        for precision, every in (("as computed", 1), ("fp16", 1), ("fp8", 1), ("fp8", 2)):
            el = src if precision == "as computed" else min(src, prec.BYTES[precision])
            cells.append(format_bytes(estimate_bytes(shapes, rd.recorded_count(steps, every), 1, el)))
        dtype = "fp32" if src == 4 else "fp16"
        rows.append(f"| {family} {side}², {dtype} K/V, {steps} steps | " + " | ".join(cells) + " |")
    return rows


def sample_kv(kind: str, device: str, seed: int) -> list[tuple[RefKey, torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    items = []
    for lid in rd.layer_table("sd15"):
        tokens, channels = rd.layer_shape("sd15", tuple(lid)[:3], 512, 512)
        pair = []
        for _ in range(2):
            t = torch.randn(1, tokens, channels, generator=g)
            if kind == "student-t":
                chi2 = torch.randn(3, 1, tokens, channels, generator=g).pow(2).sum(0)
                t = t / (chi2 / 3).sqrt()
            pair.append((t * 2.0).to(device))
        items.append((RefKey("first", 0, lid.group, lid.block_id, lid.block_index), *pair))
    return items


def errors(items, precision: str) -> tuple[float, float, float]:
    ref = Reference("bench", "sd15", precision=precision)
    ref.put_many(items)
    ref.finalize()
    worst, worst_rel, abs_sum, mag_sum = 0.0, 0.0, 0.0, 0.0
    for key, k, v in items:
        for orig, back in zip((k, v), ref.get(key, device=k.device, dtype=torch.float32), strict=True):
            err = (back - orig.float()).abs()
            worst = max(worst, float(err.max()))
            worst_rel = max(worst_rel, float(err.max() / orig.abs().max()))
            abs_sum += float(err.sum())
            mag_sum += float(orig.abs().sum())
    return worst, worst_rel, abs_sum / mag_sum


def error_rows(sets: dict) -> list[str]:
    rows = [
        "| K/V | precision | max abs error | max abs error / amax | mean abs error / mean abs |",
        "|---|---|---|---|---|",
    ]
    for name, items in sets.items():
        for precision in ("fp16", "fp8"):
            worst, rel, mean_rel = errors(items, precision)
            rows.append(f"| {name} | {precision} | {worst:.3g} | {rel:.3g} | {mean_rel:.3g} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--file", help="a saved fp32 RefDrop reference: measure the error on its K/V")
    args = ap.parse_args()
    print("\n".join(sizes(args.steps)))
    print()
    if args.file:
        ref = load_reference(args.file)
        items = [(key, *(t.float().to(args.device) for t in ref.get(key))) for key in ref]
        sets = {os.path.basename(args.file): items}
    else:
        sets = {f"SD1.5 512², {kind} ×2": sample_kv(kind, args.device, 0) for kind in ("Gaussian", "student-t")}
    print("\n".join(error_rows(sets)))


if __name__ == "__main__":
    main()
