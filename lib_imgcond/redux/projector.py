"""Flux Redux's projector: the two-layer MLP that maps SigLIP image tokens into the T5 token space, loaded from
the style model file, and the encoding of prepared images into Redux tokens (step 2 of :mod:`lib_imgcond.redux.tokens`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.vision.config import describe_keys
from lib_imgcond.vision.transformer import VisionTransformer, preprocess

_REDUX_KEYS = ("redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias")
_REDUX_FILE = "the Flux Redux style model (flux1-redux-dev.safetensors)"

# ----------------------------------------------------------------------------------------------- projector


class ReduxProjector(nn.Module):
    """The Redux MLP: ``redux_down(silu(redux_up(x)))``, 1152 → 12288 → 4096 in the released model."""

    def __init__(self, in_dim: int = 1152, hidden_dim: int = 12288, out_dim: int = 4096):
        super().__init__()
        self.redux_up = nn.Linear(in_dim, hidden_dim)
        self.redux_down = nn.Linear(hidden_dim, out_dim)

    @property
    def in_features(self) -> int:
        return self.redux_up.in_features

    @property
    def out_features(self) -> int:
        return self.redux_down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.redux_down(F.silu(self.redux_up(x)))


def load_redux(
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    source: str = "",
) -> ReduxProjector:
    """Build a :class:`ReduxProjector` from a Redux state dict; dims come from the shapes.

    Raises :class:`ImgcondError` for other files (an old T2I style adapter, a vision encoder, ...) and for
    extra, missing or inconsistent tensors.
    """
    what = source or "the file"
    keys = set(state_dict)
    if "redux_down.weight" not in keys:
        raise ImgcondError(f"{what} looks like {describe_keys(keys)}, expected {_REDUX_FILE}")
    missing, extra = set(_REDUX_KEYS) - keys, keys - set(_REDUX_KEYS)
    if missing or extra:
        detail = "; ".join(
            p
            for p in (
                f"missing {sorted(missing)}" if missing else "",
                f"unexpected {sorted(extra)[:5]}" if extra else "",
            )
            if p
        )
        raise ImgcondError(f"{what} is not a plain Redux model ({detail}); expected {_REDUX_FILE}")
    shapes = {k: tuple(state_dict[k].shape) for k in _REDUX_KEYS}
    up_w, down_w = shapes["redux_up.weight"], shapes["redux_down.weight"]
    ok = (
        len(up_w) == 2
        and len(down_w) == 2
        and down_w[1] == up_w[0]
        and shapes["redux_up.bias"] == (up_w[0],)
        and shapes["redux_down.bias"] == (down_w[0],)
    )
    if not ok:
        raise ImgcondError(f"{what}: inconsistent Redux tensor shapes {shapes}; expected {_REDUX_FILE}")
    with torch.device("meta"):
        model = ReduxProjector(up_w[1], up_w[0], down_w[0])
    tensors = {k: state_dict[k].to(device=device, dtype=dtype) for k in _REDUX_KEYS}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def encode_tokens(
    vision_model: VisionTransformer, projector: ReduxProjector, prepared_image: torch.Tensor
) -> torch.Tensor:
    """Prepared (B,3,S,S) images in [0,1] (S = the encoder's input size) → Redux tokens (B, P², out_dim).

    Runs on the devices/dtypes of the two models; the result has the projector's device and dtype.
    """
    cfg = vision_model.config
    if cfg.kind != "siglip":
        raise ImgcondError(f"Redux needs a SigLIP vision encoder, but {cfg.source or 'the encoder'} is {cfg.name}")
    if cfg.hidden != projector.in_features:
        raise ImgcondError(
            f"the Redux model expects {projector.in_features}-dim vision features, but {cfg.name} gives {cfg.hidden}"
        )
    if prepared_image.ndim == 3:
        prepared_image = prepared_image.unsqueeze(0)
    if prepared_image.ndim != 4 or tuple(prepared_image.shape[1:]) != (3, cfg.image_size, cfg.image_size):
        raise ArgumentError(
            "prepared_image", tuple(prepared_image.shape), f"(B, 3, {cfg.image_size}, {cfg.image_size})"
        )
    vparam = vision_model.vision_model.embeddings.patch_embedding.weight
    pixels = preprocess(prepared_image, cfg).to(device=vparam.device)
    hidden = vision_model(pixels).last_hidden_state
    pparam = projector.redux_up.weight
    return projector(hidden.to(device=pparam.device, dtype=pparam.dtype))
