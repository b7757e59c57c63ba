"""Random vision-encoder state dicts in the real Hugging Face key layouts, shared by the unit, glue and e2e tests."""

from __future__ import annotations

import torch

P = "vision_model."


def layer_shapes(hidden: int, layers: int, mlp: int) -> dict[str, tuple[int, ...]]:
    """Encoder layers + post-LayerNorm, common to SigLIP and CLIP vision."""
    out: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        pre = f"{P}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{pre}self_attn.{name}.weight"] = (hidden, hidden)
            out[f"{pre}self_attn.{name}.bias"] = (hidden,)
        for name in ("layer_norm1", "layer_norm2"):
            out[f"{pre}{name}.weight"] = (hidden,)
            out[f"{pre}{name}.bias"] = (hidden,)
        out[f"{pre}mlp.fc1.weight"] = (mlp, hidden)
        out[f"{pre}mlp.fc1.bias"] = (mlp,)
        out[f"{pre}mlp.fc2.weight"] = (hidden, mlp)
        out[f"{pre}mlp.fc2.bias"] = (hidden,)
    out[f"{P}post_layernorm.weight"] = (hidden,)
    out[f"{P}post_layernorm.bias"] = (hidden,)
    return out


def clip_shapes(hidden=32, layers=2, mlp=64, patch=14, grid=3, proj=24) -> dict[str, tuple[int, ...]]:
    """CLIPVisionModelWithProjection (class token, pre-LayerNorm spelled `pre_layrnorm`, visual projection)."""
    return {
        f"{P}embeddings.class_embedding": (hidden,),
        f"{P}embeddings.patch_embedding.weight": (hidden, 3, patch, patch),
        f"{P}embeddings.position_embedding.weight": (grid * grid + 1, hidden),
        f"{P}pre_layrnorm.weight": (hidden,),
        f"{P}pre_layrnorm.bias": (hidden,),
        **layer_shapes(hidden, layers, mlp),
        "visual_projection.weight": (proj, hidden),
    }


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Seeded tensors: LayerNorm weights 1, everything else N(0, scale²)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        if "norm" in key and key.endswith("weight"):
            out[key] = torch.ones(shape)
        else:
            out[key] = torch.randn(shape, generator=g) * scale
    return out


def style_adapter_shapes(width=32, tokens=8, layers=2, context=768) -> dict[str, tuple[int, ...]]:
    """The T2I-Adapter style model's tensors (TencentARC StyleAdapter names, `transformer_layes` spelling)."""
    out: dict[str, tuple[int, ...]] = {
        "style_embedding": (1, tokens, width),
        "ln_pre.weight": (width,),
        "ln_pre.bias": (width,),
        "ln_post.weight": (width,),
        "ln_post.bias": (width,),
        "proj": (width, context),
    }
    for i in range(layers):
        pre = f"transformer_layes.{i}."
        out[pre + "attn.in_proj_weight"] = (3 * width, width)
        out[pre + "attn.in_proj_bias"] = (3 * width,)
        out[pre + "attn.out_proj.weight"] = (width, width)
        out[pre + "attn.out_proj.bias"] = (width,)
        out[pre + "mlp.c_fc.weight"] = (4 * width, width)
        out[pre + "mlp.c_fc.bias"] = (4 * width,)
        out[pre + "mlp.c_proj.weight"] = (width, 4 * width)
        out[pre + "mlp.c_proj.bias"] = (width,)
        for ln in ("ln_1", "ln_2"):
            out[f"{pre}{ln}.weight"] = (width,)
            out[f"{pre}{ln}.bias"] = (width,)
    return out
