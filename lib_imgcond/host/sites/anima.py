"""Anima (Neo's `backend.nn.anima.Anima`, a Cosmos-Predict2 DiT): the self-attention of every block.

A block attends its image tokens alone (`self_attn`, after 3-D RoPE), then the prompt by cross-attention
(`cross_attn`); both call the module's `attention_function`, only the first is hooked. The tokens are the latent's
(T, H, W) patches flattened: ⌈T/pt⌉·⌈H/p⌉·⌈W/p⌉ of them (T = 1 for an image). With Neo's "Anima reference" option
(`dynamic_args.ref_latents`) the model appends the reference latent's frames after the image's; those tokens are
context the blend keeps.
"""

from __future__ import annotations

import math
from typing import Any

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host.dit_attention import Site


def _span(model: Any, x: Any, tokens: int) -> tuple[int, int]:
    p, pt = int(model.patch_spatial), int(model.patch_temporal)
    frames = math.ceil(x.shape[-3] / pt) if x.ndim == 5 else 1
    image = frames * math.ceil(x.shape[-2] / p) * math.ceil(x.shape[-1] / p)
    if image > tokens:
        raise ImgcondError(f"Anima: a self-attention call of {tokens} tokens cannot hold the {image} image tokens")
    return 0, image


def _channels(model: Any) -> int:
    attn = model.blocks[0].self_attn
    return int(attn.n_heads * attn.head_dim)


SITE = Site(
    modules=lambda model: ([block.self_attn for block in model.blocks],),
    functions=(("backend.nn.anima", "attention_function"),),
    span=_span,
    channels=_channels,
)
