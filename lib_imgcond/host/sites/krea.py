"""Krea 2 (Neo's `backend.nn.krea.SingleStreamDiT`): the joint attention of the main `blocks`.

A main block attends [prompt tokens; image tokens; reference-latent tokens (only when the call brings
`ref_latents`)]. The prompt was fused before by `txtfusion` (attention across the text encoder's layers, then over the
prompt), whose calls reach the same module function from other modules and pass untouched. The image holds
⌈H/p⌉·⌈W/p⌉ tokens (the latent padded to the patch); each reference latent adds ⌈h/p⌉·⌈w/p⌉ tokens after it, which
the reference branch keeps as context like the prompt.

Neo gives Krea 2 a Wan-style 5-D latent (B, C, T, H, W) with one frame for a still image; the host folds frames into
the batch, so a call of several frames is refused (RefDrop blends still images).
"""

from __future__ import annotations

import math
from typing import Any

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host.dit_attention import Site


def _tokens(model: Any, latent: Any) -> int:
    p = int(model.patch)
    return math.ceil(latent.shape[-2] / p) * math.ceil(latent.shape[-1] / p)


def _image(model: Any, x: Any) -> int:
    if x.ndim == 5 and x.shape[2] != 1:
        raise ImgcondError(
            f"RefDrop on Krea 2 blends still images (a latent of one frame), but this model call has {x.shape[2]} "
            "frames; turn RefDrop off for it"
        )
    return _tokens(model, x)


def _inputs(model: Any, x: Any, c: dict) -> dict:
    _image(model, x)  # refuses before the model runs
    return {"refs": sum(_tokens(model, ref) for ref in c.get("ref_latents") or ())}


def _span(model: Any, x: Any, tokens: int, refs: int = 0) -> tuple[int, int]:
    image = _image(model, x)
    start = tokens - refs - image
    if start < 0:
        raise ImgcondError(
            f"RefDrop: a Krea 2 attention call of {tokens} tokens cannot hold {image} image and {refs} reference tokens"
        )
    return start, start + image


SITE = Site(
    modules=lambda model: ([block.attn for block in model.blocks],),
    functions=(("backend.nn.krea", "attention_function"),),
    span=_span,
    channels=lambda model: int(model.first.out_features),
    inputs=_inputs,
)
