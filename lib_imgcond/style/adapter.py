"""The T2I-Adapter style model (TencentARC `StyleAdapter`, e.g. t2iadapter_style_sd14v1): CLIP vision tokens → a few
extra cross-attention tokens appended to an SD1.5 prompt.

Layout of the state dict (the parameter names of the original module; `transformer_layes` is its spelling):

    style_embedding                      (1, T, W)   T learned query tokens (8 in sd14v1), W = CLIP ViT hidden (1024)
    ln_pre.weight / .bias                (W,)
    transformer_layes.{i}.attn.in_proj_weight (3W, W), .in_proj_bias (3W,)     (torch.nn.MultiheadAttention, 8 heads)
    transformer_layes.{i}.attn.out_proj.weight (W, W), .bias (W,)
    transformer_layes.{i}.ln_1 / ln_2 .weight / .bias (W,)
    transformer_layes.{i}.mlp.c_fc.weight (4W, W), .bias; .mlp.c_proj.weight (W, 4W), .bias   (QuickGELU between)
    ln_post.weight / .bias               (W,)
    proj                                 (W, C)      C = the UNet's context width (768 for SD1.5)

Forward: the CLIP vision `last_hidden_state` (B, 1+P², W; before the post-LayerNorm) is concatenated with the style
tokens, pre-normalised, run through the residual attention blocks (pre-norm, as CLIP's), and the last T tokens are
post-normalised and projected: (B, T, C). Heads cannot be read from the weights; the style adapter uses 8.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lib_imgcond.common.errors import ImgcondError

HEADS = 8
LN_EPS = 1e-5
_LAYER_RE = re.compile(r"^transformer_layes\.(\d+)\.")
_GLOBAL = ("style_embedding", "ln_pre.weight", "ln_pre.bias", "ln_post.weight", "ln_post.bias", "proj")
_LAYER_KEYS = (
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_1.weight",
    "ln_1.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
)


@dataclass(frozen=True)
class StyleConfig:
    width: int  # W: the CLIP vision hidden size it expects
    tokens: int  # T: tokens it appends
    layers: int
    context_dim: int  # C: the UNet context width
    heads: int = HEADS


def is_style_adapter(keys) -> bool:
    return "style_embedding" in set(keys)


def detect_config(state: Mapping[str, torch.Tensor], source: str = "the style adapter") -> StyleConfig:
    """Architecture from tensor shapes; ImgcondError naming `source` for anything that is not this layout."""
    keys = set(state)
    if not is_style_adapter(keys):
        raise ImgcondError(
            f"{source} is not a T2I-Adapter style model: it has no 'style_embedding' tensor (keys such as "
            f"{', '.join(sorted(keys)[:3]) or 'none'}); use t2iadapter_style_sd14v1"
        )
    emb = state["style_embedding"]
    proj = state.get("proj")
    if emb.ndim != 3 or emb.shape[0] != 1 or proj is None or proj.ndim != 2 or proj.shape[0] != emb.shape[2]:
        raise ImgcondError(f"{source} has a malformed style_embedding / proj (shapes {tuple(emb.shape)})")
    width, tokens, context = int(emb.shape[2]), int(emb.shape[1]), int(proj.shape[1])
    layers = sorted({int(m.group(1)) for k in keys if (m := _LAYER_RE.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise ImgcondError(f"{source} has no consecutive transformer_layes.0… blocks")
    if width % HEADS:
        raise ImgcondError(f"{source}: width {width} is not divisible by the style adapter's {HEADS} heads")
    return StyleConfig(width, tokens, len(layers), context)


def expected_shapes(cfg: StyleConfig) -> dict[str, tuple[int, ...]]:
    w = cfg.width
    out = {
        "style_embedding": (1, cfg.tokens, w),
        "ln_pre.weight": (w,),
        "ln_pre.bias": (w,),
        "ln_post.weight": (w,),
        "ln_post.bias": (w,),
        "proj": (w, cfg.context_dim),
    }
    per_layer = {
        "attn.in_proj_weight": (3 * w, w),
        "attn.in_proj_bias": (3 * w,),
        "attn.out_proj.weight": (w, w),
        "attn.out_proj.bias": (w,),
        "ln_1.weight": (w,),
        "ln_1.bias": (w,),
        "mlp.c_fc.weight": (4 * w, w),
        "mlp.c_fc.bias": (4 * w,),
        "mlp.c_proj.weight": (w, 4 * w),
        "mlp.c_proj.bias": (w,),
        "ln_2.weight": (w,),
        "ln_2.bias": (w,),
    }
    for i in range(cfg.layers):
        out.update({f"transformer_layes.{i}.{k}": s for k, s in per_layer.items()})
    return out


class _Attention(nn.Module):
    """torch.nn.MultiheadAttention's parameters (packed in_proj, out_proj), computed batch-first with SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, w // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class _MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        return self.c_proj(h * torch.sigmoid(1.702 * h))  # QuickGELU


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = _Attention(width, heads)
        self.ln_1 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = _MLP(width)
        self.ln_2 = nn.LayerNorm(width, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class StyleAdapter(nn.Module):
    def __init__(self, cfg: StyleConfig):
        super().__init__()
        self.config = cfg
        self.style_embedding = nn.Parameter(torch.empty(1, cfg.tokens, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.transformer_layes = nn.Sequential(*(_Block(cfg.width, cfg.heads) for _ in range(cfg.layers)))
        self.ln_post = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.proj = nn.Parameter(torch.empty(cfg.width, cfg.context_dim))

    @torch.no_grad()
    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, W) CLIP vision hidden states (any N ≥ 1) → (B, T, C) style tokens, in the adapter's dtype."""
        if vision_tokens.ndim != 3 or vision_tokens.shape[-1] != self.config.width:
            raise ImgcondError(
                f"the style adapter takes (batch, tokens, {self.config.width}) CLIP vision states, "
                f"got {tuple(vision_tokens.shape)}"
            )
        x = vision_tokens.to(self.proj.dtype)
        style = self.style_embedding.expand(x.shape[0], -1, -1)
        x = self.ln_pre(torch.cat([x, style], dim=1))
        x = self.transformer_layes(x)
        return self.ln_post(x[:, -self.config.tokens :]) @ self.proj


def load_style_adapter(
    state: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32, source: str = "the style adapter"
) -> StyleAdapter:
    """A StyleAdapter from a state dict in the original layout (strict: every tensor present, none extra)."""
    cfg = detect_config(state, source)
    expected = expected_shapes(cfg)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        parts = [f"missing {', '.join(missing[:4])}" if missing else "", f"unexpected {', '.join(unexpected[:4])}"]
        raise ImgcondError(f"{source} does not match the T2I style adapter layout: " + "; ".join(p for p in parts if p))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {s})" for k, s in expected.items() if tuple(state[k].shape) != s]
    if wrong:
        raise ImgcondError(f"{source} has tensors of the wrong shape: {', '.join(wrong[:3])}")
    with torch.device("meta"):
        model = StyleAdapter(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def select_tokens(hidden: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Keep the class token and the patch tokens whose (grid, grid) mask value is > 0 (raster order).
    `hidden` is (1, 1 + grid², W); no mask keeps everything."""
    if token_mask is None:
        return hidden
    keep = token_mask.flatten() > 0
    if hidden.ndim != 3 or hidden.shape[1] != keep.numel() + 1:
        raise ImgcondError(f"a {tuple(token_mask.shape)} token mask does not fit vision states {tuple(hidden.shape)}")
    index = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.nonzero(keep).flatten()]).to(hidden.device)
    return hidden.index_select(1, index)


def attention_bias(total: int, span: tuple[int, int], strength: float, dtype=torch.float32, device=None):
    """(total,) additive key bias: log(strength) on the columns [span[0], span[1]), 0 elsewhere (0 → -inf)."""
    bias = torch.zeros(total, dtype=dtype, device=device)
    value = float("-inf") if strength <= 0 else float(torch.log(torch.tensor(float(strength))))
    bias[span[0] : span[1]] = value
    return bias
