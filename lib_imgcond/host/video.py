"""Forge Neo's video generation: on its Wan engine a generation samples one clip, and its batch size counts frames.

Neo (`modules/processing.py`) treats a generation as video when the engine uses the Wan VAE (`sd_model.is_wan`) and
the loaded model is a Wan one (`backend.args.dynamic_args.wan`): the batch size is the clip's pixel frames, rounded
to 4·(T − 1) + 1, and the latent is one clip of T frames (B = 1). Other engines with the Wan VAE (Anima,
Qwen-Image) generate images of one latent frame each. Forge 2.0 has no video generation.
"""

from __future__ import annotations

from typing import Any


def clip_frames(p: Any) -> int | None:
    """The latent frames of the one clip a generation of `p` samples, or None when it samples a batch of images."""
    if not getattr(p.sd_model, "is_wan", False):
        return None
    try:
        from backend.args import dynamic_args
    except ImportError:
        return None
    if not getattr(dynamic_args, "wan", False):
        return None
    return (max(1, int(getattr(p, "batch_size", 1) or 1)) - 1) // 4 + 1


def model_batch(p: Any) -> int:
    """How many images (or clips) one model call of `p`'s generation holds per conditioning branch."""
    return 1 if clip_frames(p) is not None else int(getattr(p, "batch_size", 1) or 1)
