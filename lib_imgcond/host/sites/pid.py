"""PiD (Neo's `backend.nn.pixeldit.pid.PidNet`, a `PixDiT_T2I`): its patch blocks' joint attention and its pixel
blocks' attention over the image patches.

PiD works in pixel space: the model call's latent is the image, cut into `patch_size`² pixel patches (padded up to
whole patches), one token each. A patch block (`MMDiTJointAttention`) projects the image and the text apart and
attends [text tokens; image tokens], so the image tokens are the last ⌈H/p⌉·⌈W/p⌉ of the call. A pixel block
(`PiTBlock`'s `RotaryAttention`) attends the image patches alone (each patch's pixels compressed into one token), the
whole call. The two call the attention function each module imported (`model.attention_function` and
`modules.attention_function`), the names swapped here.
"""

from __future__ import annotations

import math
from typing import Any

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host.dit_attention import Site


def _span(model: Any, x: Any, tokens: int) -> tuple[int, int]:
    p = int(model.patch_size)
    image = math.ceil(x.shape[-2] / p) * math.ceil(x.shape[-1] / p)
    start = tokens - image
    if start < 0:
        raise ImgcondError(f"a PiD attention call of {tokens} tokens cannot hold {image} image patches")
    return start, tokens


SITE = Site(
    modules=lambda model: (
        [block.attn for block in model.patch_blocks],
        [block.attn for block in model.pixel_blocks],
    ),
    functions=(
        ("backend.nn.pixeldit.model", "attention_function"),
        ("backend.nn.pixeldit.modules", "attention_function"),
    ),
    span=_span,
    channels=lambda model: int(model.hidden_size),
)
