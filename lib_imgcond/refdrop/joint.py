"""RefDrop on joint (text + image) attention, as in Flux's double- and single-stream blocks.

A reference holds the K/V of the image tokens only, after RoPE, packed as (1, tokens, heads·head_dim) like a UNet
reference. At Use time the reference branch attends the current call's text K/V followed by the reference's image
K/V, so the prompt still anchors the branch and a reference recorded with the same seed and prompt rebuilds the
plain call's K/V exactly (then the blend gives the plain output back bit for bit). Only image-token outputs are
blended: text tokens keep their own attention. The reference keeps the RoPE positions it was recorded with, so a
reference of another size is attended as it is (its keys carry their own positions; relative offsets still hold).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pack(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, tokens, head_dim) → (B, tokens, heads·head_dim), contiguous."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def unpack(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, tokens, heads·head_dim) → (B, heads, tokens, head_dim), a view."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def with_context(current: torch.Tensor, ref_packed: torch.Tensor, image: slice) -> torch.Tensor:
    """The reference branch's K (or V) for `current`'s rows: `current`'s context tokens (all but its `image` span)
    around the reference's image tokens (broadcast from batch 1), in `current`'s order. Joined in the packed layout
    (one contiguous copy; a head-major join of a packed reference would be a strided gather) and returned as a
    (B, heads, tokens, head_dim) view."""
    b, heads, n = current.shape[:3]
    start, end = image.start or 0, n if image.stop is None else image.stop
    ref = ref_packed.to(device=current.device, dtype=current.dtype)
    if ref.shape[0] != b:
        ref = ref.expand(b, *ref.shape[1:])
    parts = [pack(current[:, :, :start]), ref] if start else [ref]
    if end < n:
        parts.append(pack(current[:, :, end:]))
    return unpack(torch.cat(parts, dim=1), heads)


def with_text(current: torch.Tensor, ref_packed: torch.Tensor, n_txt: int) -> torch.Tensor:
    """`with_context` for a call whose first `n_txt` tokens are text and the rest the image (Flux's layout)."""
    return with_context(current, ref_packed, slice(n_txt, None))


def joint_blend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_txt: int,
    refs: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    attn: Attn,
) -> torch.Tensor:
    """out = attn(q, k, v) with its image-token rows replaced by (1 − Σc)·that + Σ c_j·attn(q, [k_txt; K_j], [v_txt;
    V_j]); q, k, v are (B, heads, tokens, head_dim) after RoPE, refs hold packed image-token K/V; attn returns
    (B, tokens, heads·head_dim). The reference semantics of what the patch computes."""
    base = attn(q, k, v)
    out = base.clone()
    img = out[:, n_txt:]
    for kr, vr, c in refs:
        if c == 0:
            continue
        ref_out = attn(q, with_text(k, kr, n_txt), with_text(v, vr, n_txt))[:, n_txt:]
        img.add_((ref_out - base[:, n_txt:]) * float(c))
    return out
