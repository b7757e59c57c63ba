"""ERNIE-Image (Neo's `backend.nn.ernie.ErnieImageModel`): the self-attention of its shared-AdaLN `layers`.

Each layer attends [image tokens; prompt tokens] (the image first) with no mask, RoPE applied to q and k before the
module's `attention_function`, which gets (B, tokens, heads·d). The image holds ⌊H/p⌋·⌊W/p⌋ tokens (the host's
patch embedding is a strided convolution, no padding).
"""

from __future__ import annotations

from typing import Any

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host.dit_attention import Site


def _span(model: Any, x: Any, tokens: int) -> tuple[int, int]:
    p = int(model.patch_size)
    image = (x.shape[-2] // p) * (x.shape[-1] // p)
    if image > tokens:
        raise ImgcondError(
            f"RefDrop: an ERNIE-Image attention call of {tokens} tokens cannot hold {image} image tokens"
        )
    return 0, image


SITE = Site(
    modules=lambda model: ([layer.self_attention for layer in model.layers],),
    functions=(("backend.nn.ernie", "attention_function"),),
    span=_span,
    channels=lambda model: int(model.hidden_size),
)
