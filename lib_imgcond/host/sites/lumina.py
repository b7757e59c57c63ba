"""Lumina 2 and Z-Image (Neo's `backend.nn.lumina.NextDiT`): the joint attention of the main `layers`.

A main layer attends [caption tokens (padded to `pad_tokens_multiple`); image tokens (padded likewise)]; the caption
and the image were refined apart before (`context_refiner`, `noise_refiner`), whose attention calls pass untouched.
The image tokens are found from the model call's latent: ⌈H/p⌉·⌈W/p⌉ tokens followed by the image padding, at the
end of the sequence, so they start at tokens − image − padding.
"""

from __future__ import annotations

import math
from typing import Any

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host.dit_attention import Site


def _span(model: Any, x: Any, tokens: int) -> tuple[int, int]:
    p = int(model.patch_size)
    image = math.ceil(x.shape[-2] / p) * math.ceil(x.shape[-1] / p)
    multiple = getattr(model, "pad_tokens_multiple", None)
    pad = (-image) % multiple if multiple else 0
    start = tokens - image - pad
    if start < 0:
        raise ImgcondError(f"a NextDiT attention call of {tokens} tokens cannot hold {image} image tokens")
    return start, start + image


SITE = Site(
    modules=lambda model: ([layer.attention for layer in model.layers],),
    functions=(("backend.nn.lumina", "attention_function"),),
    span=_span,
    channels=lambda model: int(model.dim),
)
