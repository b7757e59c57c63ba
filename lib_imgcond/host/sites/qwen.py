"""Qwen-Image (Neo's `backend.nn.qwen.QwenImageTransformer2DModel`): the joint attention of its `transformer_blocks`.

Each block's `attn` projects the text stream and the image stream, joins them as [text; image], applies RoPE and calls
the module's `attention_function` on (B, tokens, heads·d). The image stream is the generated image's tokens
(⌈H/p⌉·⌈W/p⌉ of the model call's latent, patchified first) followed by the tokens of any Qwen-Image-Edit reference
latents (`ref_latents`, or the engine's `dynamic_args.ref_latents`). The span is read from the attention module's
own inputs: the text is its `encoder_hidden_states`, the image stream its `hidden_states`; only the generated image's
tokens are blended, the text and the edit references stay context.
"""

from __future__ import annotations

import math
from typing import Any

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host.dit_attention import Inputs, Site

MODULE = "backend.nn.qwen"


def _modules(model: Any) -> tuple[list[Any]]:
    attns = [block.attn for block in model.transformer_blocks]
    foreign = sorted({f"{type(a).__module__}.{type(a).__qualname__}" for a in attns if type(a).__module__ != MODULE})
    if foreign:  # e.g. Nunchaku's SVDQuant blocks: another module's attention function, never swapped here
        raise ImgcondError(
            f"RefDrop on Qwen-Image: the blocks' attention is {', '.join(foreign)}, not Neo's {MODULE}.Attention "
            "(Nunchaku / SVDQuant Qwen-Image models are not supported)"
        )
    return (attns,)


def _span(model: Any, x: Any, tokens: int, inputs: Inputs | None) -> tuple[int, int]:
    text = None if inputs is None else inputs.get("encoder_hidden_states", 1)
    stream = None if inputs is None else inputs.get("hidden_states", 0)
    if text is None or stream is None:
        raise ImgcondError("RefDrop on Qwen-Image: a block's attention was called without its text and image streams")
    p = int(model.patch_size)
    image = math.ceil(x.shape[-2] / p) * math.ceil(x.shape[-1] / p)
    start = int(text.shape[1])
    if start + int(stream.shape[1]) != tokens or image > stream.shape[1]:
        raise ImgcondError(
            f"RefDrop on Qwen-Image: an attention call of {tokens} tokens does not hold {start} text tokens followed "
            f"by an image stream of {stream.shape[1]} tokens, {image} of them the generated image's"
        )
    return start, start + image


SITE = Site(
    modules=_modules,
    functions=((MODULE, "attention_function"),),
    span=_span,
    channels=lambda model: int(model.inner_dim),
    span_inputs=True,
)
