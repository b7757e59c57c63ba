"""RefDrop (reference feature guidance): attention blend, UNet layer addressing and step mapping.

The K/V store (`reference`), its file format (`file_format`), budget/compatibility checks (`checks`) and the
prefetcher (`prefetch`) live in their own modules of this package.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.refdrop.families import DIT, dit_label, dit_shape

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
RefTriple = tuple[torch.Tensor, torch.Tensor, float]

FAMILIES = ("sd15", "sdxl")
GROUPS = ("input", "middle", "output")

# ---------------------------------------------------------------------------------------------
# Attention blend
# ---------------------------------------------------------------------------------------------


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Reference kernel: (B, N, heads·d) projected tensors in, (B, Nq, heads·d) out."""
    b, n, inner = q.shape
    d = inner // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, inner)


def _match_ref(t: torch.Tensor, q: torch.Tensor, what: str) -> torch.Tensor:
    """Cast a reference K or V to q's device/dtype and broadcast a batch-1 tensor to q's batch."""
    if t.dim() != 3 or t.shape[-1] != q.shape[-1]:
        raise ImgcondError(
            f"RefDrop reference {what} has shape {tuple(t.shape)} but the model's attention uses "
            f"{q.shape[-1]} channels: the reference was recorded with a different model architecture"
        )
    if t.device != q.device or t.dtype != q.dtype:
        t = t.to(device=q.device, dtype=q.dtype)
    if t.shape[0] == q.shape[0]:
        return t
    if t.shape[0] == 1:
        return t.expand(q.shape[0], -1, -1)
    raise ImgcondError(
        f"RefDrop reference {what} has batch {t.shape[0]} but the attention batch is {q.shape[0]}; "
        "a reference must have batch 1 or the same batch"
    )


def blend_outputs(base: torch.Tensor, outs: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """base + Σ c_j·(out_j − base): the RFG blend of already computed attention outputs.

    Algebraically (1 − Σc)·base + Σ c_j·out_j, written so that a reference output equal to `base` (record and use
    with the same seed) gives back `base` bit for bit, whatever c is.
    """
    out = base
    for ref_out, c in outs:
        if c != 0:
            out = out + (ref_out - base) * float(c)
    return out


def rfg_blend(base: torch.Tensor, q: torch.Tensor, refs: Sequence[RefTriple], attn: AttnFn, heads: int) -> torch.Tensor:
    """blend_outputs(base, [(attn(q, k_j, v_j), c_j)]), where base = attn(q, k, v) was already computed."""
    outs = [(attn(q, _match_ref(kr, q, "K"), _match_ref(vr, q, "V"), heads), c) for kr, vr, c in refs if c != 0]
    return blend_outputs(base, outs)


def rfg_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    refs: Sequence[RefTriple],
    attn: AttnFn,
    heads: int,
) -> torch.Tensor:
    """(1 − Σc)·attn(q,k,v) + Σ c_j·attn(q,k_j,v_j); exactly attn(q,k,v) when every c is 0."""
    return rfg_blend(attn(q, k, v, heads), q, refs, attn, heads)


# ---------------------------------------------------------------------------------------------
# Layer addressing
# ---------------------------------------------------------------------------------------------


class LayerId(NamedTuple):
    """One transformer block: Forge's (block[0], block[1], block_index) plus its index in the group."""

    group: str
    block_id: int
    block_index: int
    index: int


# group -> [(block_id, depth, resolution level, channels)]
_BLOCKS: dict[str, dict[str, list[tuple[int, int, int, int]]]] = {
    "sd15": {
        "input": [(1, 1, 0, 320), (2, 1, 0, 320), (4, 1, 1, 640), (5, 1, 1, 640), (7, 1, 2, 1280), (8, 1, 2, 1280)],
        "middle": [(0, 1, 3, 1280)],
        "output": [(i, 1, 2, 1280) for i in (3, 4, 5)]
        + [(i, 1, 1, 640) for i in (6, 7, 8)]
        + [(i, 1, 0, 320) for i in (9, 10, 11)],
    },
    "sdxl": {
        "input": [(4, 2, 1, 640), (5, 2, 1, 640), (7, 10, 2, 1280), (8, 10, 2, 1280)],
        "middle": [(0, 10, 2, 1280)],
        "output": [(i, 10, 2, 1280) for i in (0, 1, 2)] + [(i, 2, 1, 640) for i in (3, 4, 5)],
    },
}


def family_label(family: str) -> str:
    """The family as messages name it: 'sdxl', 'Flux (19 double + 38 single blocks, 3072 channels)'."""
    return dit_label(family) or family


def check_family(family: str) -> str:
    """Return ``family`` if it is supported, else raise ImgcondError."""
    if family not in FAMILIES and dit_shape(family) is None:
        names = ", ".join(f.label for f in DIT.values())
        raise ImgcondError(
            f"RefDrop supports SD1.5 and SDXL UNets (family 'sd15' or 'sdxl') and {names}, not {family!r}"
        )
    return family


def groups(family: str) -> tuple[str, ...]:
    """The layer groups of ``family``: input/middle/output on a UNet, double/single on a DiT."""
    dit = dit_shape(check_family(family))
    return DIT[dit[0]].groups if dit else GROUPS


@cache
def _table(family: str) -> tuple[LayerId, ...]:
    dit = dit_shape(family)
    if dit is not None:
        base, counts, _ = dit
        return tuple(LayerId(g, i, 0, i) for g, n in zip(DIT[base].groups, counts, strict=True) for i in range(n))
    out = []
    for group in GROUPS:
        index = 0
        for block_id, depth, _, _ in _BLOCKS[family][group]:
            for block_index in range(depth):
                out.append(LayerId(group, block_id, block_index, index))
                index += 1
    return tuple(out)


@cache
def _lookup(family: str) -> dict[tuple[str, int, int], LayerId]:
    return {(lid.group, lid.block_id, lid.block_index): lid for lid in _table(family)}


def layer_table(family: str) -> list[LayerId]:
    """All transformer blocks of ``family`` in UNet execution order."""
    return list(_table(check_family(family)))


def layer_of(family: str, block: Sequence[Any], block_index: int) -> LayerId | None:
    """Map Forge's ``extra_options['block']`` and ``['block_index']`` to a LayerId (None if unknown)."""
    if len(block) < 2:
        return None
    return _lookup(check_family(family)).get((str(block[0]), int(block[1]), int(block_index)))


def group_size(family: str, group: str) -> int:
    """Number of transformer blocks in ``group``."""
    return sum(1 for lid in _table(check_family(family)) if lid.group == group)


def layer_shape(family: str, layer: Sequence[Any], width: int, height: int) -> tuple[int, int]:
    """(tokens, channels) of a layer's self-attention K or V for an image of width×height pixels."""
    group, block_id = str(layer[0]), int(layer[1])
    dit = dit_shape(check_family(family))
    if dit is not None:  # image tokens: the family's pixels per token side (VAE downscale × patch size)
        base, counts, channels = dit
        fam = DIT[base]
        if group not in fam.groups or not 0 <= block_id < counts[fam.groups.index(group)]:
            raise ImgcondError(f"{group}:{block_id} is not a block of {family_label(family)}")
        return math.ceil(width / fam.patch) * math.ceil(height / fam.patch), channels
    for bid, _, level, channels in _BLOCKS[check_family(family)].get(group, []):
        if bid == block_id:
            w, h = math.ceil(width / 8), math.ceil(height / 8)
            for _ in range(level):
                w, h = math.ceil(w / 2), math.ceil(h / 2)
            return w * h, channels
    raise ImgcondError(f"{group}:{block_id} is not a transformer block of {family}")


def _ranges_text(family: str) -> str:
    return ", ".join(f"{g} 0–{group_size(family, g) - 1}" for g in groups(family) if group_size(family, g))


def _bad_token(token: str, family: str) -> ArgumentError:
    names = groups(family)
    allowed = (
        f"'all', group names ({', '.join(names)}) or group:indices such as '{names[-1]}:0-1' "
        f"(valid indices on {family_label(family)}: {_ranges_text(family)})"
    )
    return ArgumentError("RefDrop layers", token, allowed)


def _parse_indices(token: str, group: str, family: str) -> set[int]:
    size = group_size(family, group)
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", token)
    if not m:
        raise _bad_token(f"{group}:{token}", family)
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if lo > hi or hi >= size:
        allowed = f"indices 0–{size - 1} for {group} on {family_label(family)} (ranges written low-high)"
        raise ArgumentError("RefDrop layers", f"{group}:{token}", allowed)
    return set(range(lo, hi + 1))


def parse_layers(spec: str, family: str) -> frozenset[LayerId]:
    """Parse 'all', '' (all), 'none', 'input, middle', 'output:0-5, middle', 'input:0,2,4-6' (UNet) or
    'double, single:0-9' (DiT)."""
    table = _table(check_family(family))
    names = groups(family)
    text = re.sub(r"\s*([:\-])\s*", r"\1", (spec or "").strip().lower())
    tokens = [t for t in re.split(r"[,;\s]+", text) if t]
    if not tokens or tokens == ["all"]:
        return frozenset(table)
    if tokens == ["none"]:
        return frozenset()
    chosen: set[tuple[str, int]] = set()
    group: str | None = None
    for token in tokens:
        if token == "all":
            chosen.update((lid.group, lid.index) for lid in table)
            group = None
        elif token in names:
            chosen.update((token, i) for i in range(group_size(family, token)))
            group = None
        elif ":" in token:
            group, _, rest = token.partition(":")
            if group not in names or not rest:
                raise _bad_token(token, family)
            chosen.update((group, i) for i in _parse_indices(rest, group, family))
        elif group is not None:
            chosen.update((group, i) for i in _parse_indices(token, group, family))
        else:
            raise _bad_token(token, family)
    return frozenset(lid for lid in table if (lid.group, lid.index) in chosen)


def _compress(indices: Iterable[int]) -> str:
    parts: list[str] = []
    run: list[int] = []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def format_layers(selection: Iterable[Sequence[Any]], family: str) -> str:
    """Canonical compact text for a layer selection; parse_layers(format_layers(s)) == s."""
    lookup = _lookup(check_family(family))
    chosen: set[LayerId] = set()
    for item in selection:
        lid = lookup.get((str(item[0]), int(item[1]), int(item[2])))
        if lid is None:
            raise ImgcondError(f"{item[0]}:{item[1]}/{item[2]} is not a transformer block of {family}")
        chosen.add(lid)
    if len(chosen) == len(lookup):
        return "all"
    if not chosen:
        return "none"
    parts = []
    for group in groups(family):
        idx = [lid.index for lid in chosen if lid.group == group]
        if len(idx) == group_size(family, group):
            parts.append(group)
        elif idx:
            parts.append(f"{group}:{_compress(idx)}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Step mapping
# ---------------------------------------------------------------------------------------------


def map_step(use_step: int, use_steps: int, rec_steps: int) -> int:
    """Map a Use-run step to a recorded step by normalised progress (halves round up)."""
    if use_steps < 1 or rec_steps < 1:
        raise ArgumentError("steps", (use_steps, rec_steps), "step counts of at least 1")
    if use_steps == 1:
        return 0
    num, den = use_step * (rec_steps - 1), use_steps - 1
    mapped = (2 * num + den) // (2 * den)
    return min(max(mapped, 0), rec_steps - 1)


def recorded_count(evaluations: int, every: int) -> int:
    """How many of `evaluations` model evaluations a Record keeps when it keeps every `every`-th (0, k, 2k, ...)."""
    if every < 1:
        raise ArgumentError("refdrop.record_every", every, "an integer of at least 1")
    return -(-int(evaluations) // every)


def recorded_trace(trace: Sequence[float], every: int) -> list[float]:
    """The progress of each kept evaluation, in recorded order (recorded evaluation j is evaluation j·every)."""
    recorded_count(len(trace), every)
    return [float(x) for x in trace[::every]]


def step_in_window(step: int, steps: int, start: float, end: float) -> bool:
    """True when start ≤ step/steps < end; with end ≥ 1 the last step (and any overrun) is included."""
    if steps < 1:
        raise ArgumentError("steps", steps, "at least 1")
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ArgumentError("RefDrop step window", (start, end), "start and end between 0 and 1")
    frac = step / steps
    if end >= 1.0:
        return frac >= start
    return start <= frac < end
