"""A Flux.1-dev-shaped transformer in plain torch, for benchmarking RefDrop's Flux patch without a WebUI.

It follows Flux.1-dev's layout: 64-channel packed latents (16 VAE channels × 2×2 patches), hidden size 3072 in 24
heads of 128, 19 double-stream blocks (image and text streams, each with modulation, QK-RMSNorm, joint attention,
4× GELU MLP) and 38 single-stream blocks (one fused QKV+MLP linear), 3-axis RoPE (16/56/56), timestep, guidance and
pooled-CLIP embeddings, 4096-wide T5 context; about 11.9 B parameters. Weights are random.

Like the hosts' Flux modules, every block calls this module's `attention(q, k, v, pe)` by name (RoPE, then
`attention_function`), so `lib_imgcond.host.flux_attention` swaps it exactly as it swaps a host's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def attention_function(q, k, v, heads, skip_reshape=True, mask=None):
    """(B, H, L, D) → (B, L, H·D) through torch SDPA."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def apply_rope(q, k, pe):
    """Rotate (…, D) pairs by the (B, 1, L, D/2, 2, 2) rotation matrices `pe`."""

    def rot(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
        return out.reshape(*x.shape).type_as(x)

    return rot(q), rot(k)


def attention(q, k, v, pe):
    q, k = apply_rope(q, k, pe)
    return attention_function(q, k, v, q.shape[1], skip_reshape=True)


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / theta**scale
    out = pos.double().unsqueeze(-1) * omega
    out = torch.stack([out.cos(), -out.sin(), out.sin(), out.cos()], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    t = 1000.0 * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Stream(nn.Module):
    """One stream of a double block: modulation (6 vectors), norm, QKV, QK-norm, projection, MLP."""

    def __init__(self, hidden: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.mod = nn.Linear(hidden, 6 * hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.norm = QKNorm(hidden // heads)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, hidden))

    def qkv_of(self, x, vec):
        mods = self.mod(F.silu(vec)).chunk(6, dim=-1)
        h = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), mods[0], mods[1])
        q, k, v = self.qkv(h).view(x.shape[0], x.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        return q, k, v, mods

    def finish(self, x, attn, mods):
        x = x + mods[2][:, None] * self.proj(attn)
        h = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), mods[3], mods[4])
        return x + mods[5][:, None] * self.mlp(h)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp: int):
        super().__init__()
        self.img, self.txt = Stream(hidden, heads, mlp), Stream(hidden, heads, mlp)

    def forward(self, img, txt, vec, pe):
        iq, ik, iv, imods = self.img.qkv_of(img, vec)
        tq, tk, tv, tmods = self.txt.qkv_of(txt, vec)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((tq, iq), (tk, ik), (tv, iv)))
        attn = attention(q, k, v, pe=pe)
        n_txt = txt.shape[1]
        return self.img.finish(img, attn[:, n_txt:], imods), self.txt.finish(txt, attn[:, :n_txt], tmods)


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp: int):
        super().__init__()
        self.hidden, self.heads, self.mlp_dim = hidden, heads, mlp
        self.mod = nn.Linear(hidden, 3 * hidden)
        self.linear1 = nn.Linear(hidden, 3 * hidden + mlp)
        self.linear2 = nn.Linear(hidden + mlp, hidden)
        self.norm = QKNorm(hidden // heads)

    def forward(self, x, vec, pe):
        shift, scale, gate = self.mod(F.silu(vec)).chunk(3, dim=-1)
        h = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale)
        qkv, mlp = torch.split(self.linear1(h), [3 * self.hidden, self.mlp_dim], dim=-1)
        q, k, v = qkv.view(x.shape[0], x.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe)
        return x + gate[:, None] * self.linear2(torch.cat((attn, F.gelu(mlp, approximate="tanh")), dim=2))


class FluxShaped(nn.Module):
    def __init__(self, hidden=3072, heads=24, double=19, single=38, mlp_ratio=4.0, axes=(16, 56, 56), context=4096):
        super().__init__()
        mlp = int(hidden * mlp_ratio)
        self.hidden_size, self.axes = hidden, axes
        self.img_in, self.txt_in = nn.Linear(64, hidden), nn.Linear(context, hidden)
        self.time_in, self.guidance_in, self.vector_in = (
            MLPEmbedder(256, hidden),
            MLPEmbedder(256, hidden),
            MLPEmbedder(768, hidden),
        )
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden, heads, mlp) for _ in range(double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden, heads, mlp) for _ in range(single))
        self.final_mod, self.final = nn.Linear(hidden, 2 * hidden), nn.Linear(hidden, 64)

    def forward(self, x, timestep, context, y, guidance, transformer_options=None, **_):
        b, c, h, w = x.shape
        ph, pw = h // 2, w // 2
        img = self.img_in(x.reshape(b, c, ph, 2, pw, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, ph * pw, c * 4))
        vec = self.time_in(timestep_embedding(timestep).to(img.dtype))
        vec = vec + self.guidance_in(timestep_embedding(guidance).to(img.dtype)) + self.vector_in(y)
        txt = self.txt_in(context)
        ids = torch.zeros(ph, pw, 3, device=x.device)
        ids[..., 1] += torch.arange(ph, device=x.device)[:, None]
        ids[..., 2] += torch.arange(pw, device=x.device)[None, :]
        ids = torch.cat((torch.zeros(txt.shape[1], 3, device=x.device), ids.reshape(-1, 3)))[None].expand(b, -1, -1)
        pe = torch.cat([rope(ids[..., i], d, 10000) for i, d in enumerate(self.axes)], dim=-3).unsqueeze(1)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x_all = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x_all = block(x_all, vec, pe)
        img = x_all[:, txt.shape[1] :]
        shift, scale = self.final_mod(F.silu(vec)).chunk(2, dim=-1)
        out = self.final(modulate(F.layer_norm(img, img.shape[-1:], eps=1e-6), shift, scale))
        return out.reshape(b, ph, pw, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
