"""Wan (Neo's `backend.nn.wan.WanModel`: Wan 2.1, 2.2 A14B): the self-attention of every block, over a whole clip.

A block attends the clip's video tokens (`self_attn`, after 3-D RoPE), then the prompt by cross-attention. The
self-attention calls the module's `attention` (a hook point Neo keeps for Radial Attention); the cross-attention
calls `attention_function` directly and is left alone. The tokens are the latent's (T, H, W) patches flattened,
⌈T/pt⌉·⌈H/ph⌉·⌈W/pw⌉ of them, frame after frame; frames the model appends after the clip (`time_dim_concat`) are
context the blend keeps.
"""

from __future__ import annotations

import math
from typing import Any

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host.dit_attention import Site


def _span(model: Any, x: Any, tokens: int) -> tuple[int, int]:
    image = math.prod(math.ceil(n / int(p)) for n, p in zip(x.shape[-3:], model.patch_size, strict=True))
    if image > tokens:
        raise ImgcondError(f"Wan: a self-attention call of {tokens} tokens cannot hold the {image} video tokens")
    return 0, image


SITE = Site(
    modules=lambda model: ([block.self_attn for block in model.blocks],),
    functions=(("backend.nn.wan", "attention"),),
    span=_span,
    channels=lambda model: int(model.dim),
)
