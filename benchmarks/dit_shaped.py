"""Z-Image- and Qwen-Image-shaped transformers in plain torch, for benchmarking RefDrop on Neo's DiT sites without a
WebUI. Weights are random; only the shapes and the attention layout matter.

* `ZImageShaped`: Z-Image Turbo's layout (Neo's NextDiT with Z-Image settings): hidden 3840 in 30 heads of 128,
  30 single-stream layers over [caption; image] joint tokens, both padded to multiples of 32, a noise refiner (2
  image-only layers) and a context refiner (2 caption-only layers), SwiGLU FFN 10240, QK-RMSNorm, 2×2 patches of a
  16-channel latent; about 6.2 B parameters.
* `QwenShaped`: Qwen-Image's layout: hidden 3072 in 24 heads of 128, 60 double-stream blocks (separate text and
  image projections, modulation and GELU MLPs of 4×, joint attention over [text; image]), 2×2 patches of a 16-channel
  latent, 3584-wide text features; about 20.4 B parameters.

Every attention calls this module's `attention_function(q, k, v, heads, mask, skip_reshape=True)` by name, after
RoPE, as Neo's blocks call theirs, so `lib_imgcond.host.dit_attention` swaps it as it swaps a host's. The attribute
names the project's sites read (`layers[i].attention`, `patch_size`, `pad_tokens_multiple`, `dim`;
`transformer_blocks[i].attn`) are those of Neo's classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_function(q, k, v, heads, mask=None, skip_reshape=False, **_kw):
    """(B, H, L, D) (or (B, L, H·D)) → (B, L, H·D) through torch SDPA."""
    if not skip_reshape:
        b, n, c = q.shape
        q, k, v = (t.view(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate (B, L, H, D) pairs by per-token angles (L, D/2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = freqs.cos()[None, :, None], freqs.sin()[None, :, None]
    out = torch.stack((pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 0] * sin + pairs[..., 1] * cos), -1)
    return out.reshape(x.shape).type_as(x)


def angles(n: int, dim: int, device) -> torch.Tensor:
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    return pos * inv


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.scale)


class JointAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def forward(self, x, freqs):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        q, k = rope(self.q_norm(q), freqs), rope(self.k_norm(k), freqs)
        out = attention_function(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.heads,
                                 None, skip_reshape=True)  # fmt: skip
        return self.out(out)


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.attention = JointAttention(dim, heads)
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.w13 = nn.Linear(dim, 2 * ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)
        self.mod = nn.Linear(256, 4 * dim)

    def forward(self, x, freqs, t):
        s1, g1, s2, g2 = self.mod(t)[:, None].chunk(4, dim=-1)
        x = x + g1.tanh() * self.attention(self.norm1(x) * (1 + s1), freqs)
        a, b = self.w13(self.norm2(x) * (1 + s2)).chunk(2, dim=-1)
        return x + g2.tanh() * self.w2(F.silu(a) * b)


class ZImageShaped(nn.Module):
    def __init__(self, dim=3840, heads=30, layers=30, refiners=2, ffn=10240, cap_dim=2560, channels=16):
        super().__init__()
        self.dim, self.patch_size, self.pad_tokens_multiple, self.channels = dim, 2, 32, channels
        self.x_embed = nn.Linear(4 * channels, dim)
        self.cap_embed = nn.Linear(cap_dim, dim)
        self.t_embed = nn.Linear(256, 256)
        self.noise_refiner = nn.ModuleList(Layer(dim, heads, ffn) for _ in range(refiners))
        self.context_refiner = nn.ModuleList(Layer(dim, heads, ffn) for _ in range(refiners))
        self.layers = nn.ModuleList(Layer(dim, heads, ffn) for _ in range(layers))
        self.final = nn.Linear(dim, 4 * channels)

    def forward(self, x, t, context, **_kw):
        b, c, h, w = x.shape
        img = self.x_embed(x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, 4 * c))
        cap = self.cap_embed(context)
        pad = lambda z: F.pad(z, (0, 0, 0, (-z.shape[1]) % 32))  # noqa: E731
        img, cap = pad(img), pad(cap)
        temb = self.t_embed(torch.cos(t[:, None] * torch.arange(256, device=x.device))).to(x.dtype)
        head_dim = self.dim // self.layers[0].attention.heads
        f_img, f_cap = angles(img.shape[1], head_dim, x.device), angles(cap.shape[1], head_dim, x.device)
        for layer in self.context_refiner:
            cap = layer(cap, f_cap, temb)
        for layer in self.noise_refiner:
            img = layer(img, f_img, temb)
        joint = torch.cat((cap, img), dim=1)
        f_joint = torch.cat((f_cap, f_img))
        for layer in self.layers:
            joint = layer(joint, f_joint, temb)
        out = self.final(joint[:, cap.shape[1] : cap.shape[1] + (h // 2) * (w // 2)])
        return out.view(b, h // 2, w // 2, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class DoubleAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.img_qkv, self.txt_qkv = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.img_out, self.txt_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norms = nn.ModuleList(RMSNorm(self.head_dim) for _ in range(4))

    def forward(self, img, txt, freqs):
        b, ni, nt = img.shape[0], img.shape[1], txt.shape[1]
        qi, ki, vi = self.img_qkv(img).view(b, ni, 3, self.heads, self.head_dim).unbind(2)
        qt, kt, vt = self.txt_qkv(txt).view(b, nt, 3, self.heads, self.head_dim).unbind(2)
        q = torch.cat((self.norms[2](qt), self.norms[0](qi)), dim=1)
        k = torch.cat((self.norms[3](kt), self.norms[1](ki)), dim=1)
        q, k, v = rope(q, freqs), rope(k, freqs), torch.cat((vt, vi), dim=1)
        out = attention_function(q.flatten(2), k.flatten(2), v.flatten(2), self.heads, None)
        return self.img_out(out[:, nt:]), self.txt_out(out[:, :nt])


class DoubleBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.attn = DoubleAttention(dim, heads)
        self.img_mod, self.txt_mod = nn.Linear(dim, 6 * dim), nn.Linear(dim, 6 * dim)
        self.img_mlp = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))
        self.txt_mlp = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))

    def forward(self, img, txt, temb, freqs):
        mi, mt = self.img_mod(temb)[:, None].chunk(6, dim=-1), self.txt_mod(temb)[:, None].chunk(6, dim=-1)
        ln = lambda z: F.layer_norm(z, (z.shape[-1],))  # noqa: E731
        ai, at = self.attn(ln(img) * (1 + mi[1]) + mi[0], ln(txt) * (1 + mt[1]) + mt[0], freqs)
        img, txt = img + mi[2] * ai, txt + mt[2] * at
        img = img + mi[5] * self.img_mlp(ln(img) * (1 + mi[4]) + mi[3])
        txt = txt + mt[5] * self.txt_mlp(ln(txt) * (1 + mt[4]) + mt[3])
        return img, txt


class QwenShaped(nn.Module):
    def __init__(self, dim=3072, heads=24, blocks=60, ffn=12288, txt_dim=3584, channels=16):
        super().__init__()
        self.dim = self.inner_dim = dim
        self.patch_size, self.channels = 2, channels
        self.img_in, self.txt_in = nn.Linear(4 * channels, dim), nn.Linear(txt_dim, dim)
        self.t_embed = nn.Linear(256, dim)
        self.transformer_blocks = nn.ModuleList(DoubleBlock(dim, heads, ffn) for _ in range(blocks))
        self.proj_out = nn.Linear(dim, 4 * channels)

    def forward(self, x, t, context, **_kw):
        b, c, h, w = x.shape
        img = self.img_in(x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, 4 * c))
        txt = self.txt_in(context)
        temb = F.silu(self.t_embed(torch.cos(t[:, None] * torch.arange(256, device=x.device)).to(x.dtype)))
        freqs = angles(txt.shape[1] + img.shape[1], self.dim // self.transformer_blocks[0].attn.heads, x.device)
        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb, freqs)
        out = self.proj_out(img)
        return out.view(b, h // 2, w // 2, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


SHAPES = {"zimage": ZImageShaped, "qwen_image": QwenShaped}
