"""An SDXL-shaped UNet in plain torch, for benchmarking attention patches without Forge.

It follows SDXL's layout (model channels 320, multipliers 1/2/4, two ResBlocks per level, transformer depths 0/2/10,
2048-wide text context, 2816-wide ADM vector, linear proj_in/proj_out, 64-wide heads), so at 1024×1024 (latent
128×128) it has the same 70 BasicTransformerBlocks with the same token counts and widths:

* input 4, 5 and output 3, 4, 5: depth 2 at 4096 tokens × 640 channels (10 blocks);
* input 7, 8, middle and output 0, 1, 2: depth 10 at 1024 tokens × 1280 channels (60 blocks).

Weights are random. The self-attention of every block honours an attn1 replace exactly as Forge's (ComfyUI-derived)
BasicTransformerBlock does: when ``transformer_options['patches_replace']['attn1']`` holds a function for
``(block_name, block_id, block_index)`` (or for ``(block_name, block_id)``), the block computes ``q, k, v =
to_q(n), to_k(n), to_v(n)``, calls ``replace(q, k, v, extra_options)`` and applies ``to_out`` to the result.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 64


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Nq, H·d), (B, Nk, H·d), (B, Nk, H·d) → (B, Nq, H·d) through torch SDPA.

    Deliberately not imported from lib_imgcond (its `refdrop.layers.sdpa` is the same kernel): the benchmark model must
    not depend on the library under test, so `refdrop_bench.py --lib` can load another copy of it."""
    b, n, inner = q.shape
    d = inner // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, inner)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None, heads: int):
        super().__init__()
        inner = heads * HEAD_DIM
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLUFeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, dim * mult * 2)
        self.out = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        heads = dim // HEAD_DIM
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, None, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, transformer_options: dict[str, Any]) -> torch.Tensor:
        block = transformer_options.get("block")
        block_index = transformer_options.get("block_index", 0)
        replaces = transformer_options.get("patches_replace", {}).get("attn1", {})
        n = self.norm1(x)
        replace = None
        if block is not None:
            replace = replaces.get((block[0], block[1], block_index)) or replaces.get((block[0], block[1]))
        if replace is not None:
            extra_options = dict(transformer_options)
            extra_options.update(n_heads=self.attn1.heads, dim_head=HEAD_DIM, original_shape=list(x.shape))
            q, k, v = self.attn1.to_q(n), self.attn1.to_k(n), self.attn1.to_v(n)
            n = self.attn1.to_out(replace(q, k, v, extra_options))
        else:
            n = self.attn1(n)
        x = x + n
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, depth: int, context_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(channels, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, transformer_options: dict[str, Any]) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = i
            x = block(x, context, transformer_options)
        x = self.proj_out(x)
        return x.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous() + x_in


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.in_norm = nn.GroupNorm(32, cin)
        self.in_conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.out_norm = nn.GroupNorm(32, cout)
        self.out_conv = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(F.silu(self.in_norm(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.out_conv(F.silu(self.out_norm(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """One entry of input_blocks / middle_block / output_blocks: ResBlock, optional transformer, optional resample."""

    def __init__(self, res: ResBlock | None, attn: SpatialTransformer | None, resample: nn.Module | None, res2=None):
        super().__init__()
        self.res, self.attn, self.resample, self.res2 = res, attn, resample, res2

    def forward(self, x, emb, context, transformer_options):
        if self.res is not None:
            x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x, context, transformer_options)
        if self.res2 is not None:
            x = self.res2(x, emb)
        if self.resample is not None:
            x = self.resample(x)
        return x


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class SDXLShapedUNet(nn.Module):
    """SDXL's UNet layout with random weights. ``model_channels`` can be shrunk for CPU smoke tests."""

    def __init__(self, model_channels: int = 320, context_dim: int = 2048, adm_dim: int = 2816):
        super().__init__()
        mc = model_channels
        c1, c2, c3 = mc, 2 * mc, 4 * mc
        emb_dim = 4 * mc
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Sequential(nn.Linear(adm_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(4, c1, 3, padding=1)

        def st(ch, depth):
            return SpatialTransformer(ch, depth, context_dim)

        def rb(cin, cout):
            return ResBlock(cin, cout, emb_dim)

        # input_blocks[0] is conv_in; ids 1..8 as in SDXL
        self.input_blocks = nn.ModuleList(
            [
                nn.Identity(),
                Stage(rb(c1, c1), None, None),
                Stage(rb(c1, c1), None, None),
                Stage(None, None, Downsample(c1)),
                Stage(rb(c1, c2), st(c2, 2), None),
                Stage(rb(c2, c2), st(c2, 2), None),
                Stage(None, None, Downsample(c2)),
                Stage(rb(c2, c3), st(c3, 10), None),
                Stage(rb(c3, c3), st(c3, 10), None),
            ]
        )
        self.middle_block = Stage(rb(c3, c3), st(c3, 10), None, res2=rb(c3, c3))
        self.output_blocks = nn.ModuleList(
            [
                Stage(rb(c3 + c3, c3), st(c3, 10), None),
                Stage(rb(c3 + c3, c3), st(c3, 10), None),
                Stage(rb(c3 + c2, c3), st(c3, 10), Upsample(c3)),
                Stage(rb(c3 + c2, c2), st(c2, 2), None),
                Stage(rb(c2 + c2, c2), st(c2, 2), None),
                Stage(rb(c2 + c1, c2), st(c2, 2), Upsample(c2)),
                Stage(rb(c2 + c1, c1), None, None),
                Stage(rb(c1 + c1, c1), None, None),
                Stage(rb(c1 + c1, c1), None, None),
            ]
        )
        self.out = nn.Sequential(nn.GroupNorm(32, c1), nn.SiLU(), nn.Conv2d(c1, 4, 3, padding=1))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor,
        transformer_options: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        opts = dict(transformer_options or {})
        dtype = self.conv_in.weight.dtype
        t_emb = timestep_embedding(timesteps, self.model_channels).to(dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y.to(dtype))
        context = context.to(dtype)
        h = self.conv_in(x.to(dtype))
        hs = [h]
        opts["transformer_index"] = 0
        for block_id in range(1, len(self.input_blocks)):
            opts["block"] = ("input", block_id)
            h = self.input_blocks[block_id](h, emb, context, opts)
            hs.append(h)
        opts["block"] = ("middle", 0)
        h = self.middle_block(h, emb, context, opts)
        for block_id, stage in enumerate(self.output_blocks):
            opts["block"] = ("output", block_id)
            h = stage(torch.cat([h, hs.pop()], dim=1), emb, context, opts)
        return self.out(h).to(x.dtype)


def transformer_keys(model: SDXLShapedUNet) -> list[tuple[str, int, int]]:
    """(block_name, block_id, block_index) of every BasicTransformerBlock, in execution order."""
    keys = []
    groups = [("input", i, s) for i, s in enumerate(model.input_blocks)]
    groups += [("middle", 0, model.middle_block)]
    groups += [("output", i, s) for i, s in enumerate(model.output_blocks)]
    for name, block_id, stage in groups:
        attn = getattr(stage, "attn", None)
        if attn is not None:
            keys += [(name, block_id, i) for i in range(len(attn.transformer_blocks))]
    return keys


def estimate_flops(model: SDXLShapedUNet, height: int, width: int, batch: int) -> float:
    """Matrix-product FLOPs of one forward (linears, convs, attention), for a sanity check of the timing."""
    total = 0.0
    sizes: dict[nn.Module, tuple[int, int]] = {}
    lat_h, lat_w = height // 8, width // 8

    def note(stage: nn.Module, hw: tuple[int, int]) -> None:
        for m in stage.modules():
            sizes.setdefault(m, hw)

    level = [(lat_h, lat_w), (lat_h // 2, lat_w // 2), (lat_h // 4, lat_w // 4)]
    in_levels = [0, 0, 0, 0, 1, 1, 1, 2, 2]
    out_levels = [2, 2, 2, 1, 1, 1, 0, 0, 0]
    note(model.conv_in, level[0])
    for stage, lv in zip(model.input_blocks, in_levels, strict=True):
        note(stage, level[lv])
    note(model.middle_block, level[2])
    for stage, lv in zip(model.output_blocks, out_levels, strict=True):
        note(stage, level[lv])
    note(model.out, level[0])
    upsample_convs = {id(m.conv) for m in model.modules() if isinstance(m, Upsample)}
    per_sample = {id(m.emb) for m in model.modules() if isinstance(m, ResBlock)}
    for m, (h, w) in sizes.items():
        tokens = h * w
        if isinstance(m, nn.Conv2d):
            oh, ow = (h // 2, w // 2) if m.stride[0] == 2 else (h, w)
            if id(m) in upsample_convs:
                oh, ow = 2 * h, 2 * w
            total += 2 * oh * ow * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear) and m.in_features != 2048 and id(m) not in per_sample:
            total += 2 * tokens * m.in_features * m.out_features
        elif isinstance(m, BasicTransformerBlock):
            c = m.attn1.heads * HEAD_DIM
            total += 4 * tokens * tokens * c + 4 * tokens * 77 * c + 2 * 2 * 77 * 2048 * c
    return total * batch
