"""FlexDiffuse's parameters, constants and the helpers its steps share (input checks, similarity scores).

The technique and its two modes are described in :mod:`lib_imgcond.flexdiffuse.guidance`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError

CHUNK = 77
"""Tokens per CLIP text chunk (SD1.x / SDXL)."""

PRIORITIES = ("text_order", "best_fit", "direct")
"""Mapping priorities: by text position, by best score first, or image token i to slot i."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SOFTMAX_TEMPERATURE = 100.0
"""CLIP's logit scale: scores are softmax over text tokens of 100·cos."""

DIRECT_HEADER_PULL = 0.85
"""Direct image guidance moves image token 0 this far toward the prompt header."""

SDXL_L_DIM = 768
SDXL_G_DIM = 1280

_ENCODER_HINT = {
    768: "pick the ViT-L/14 encoder for SD1.5 (and for SDXL's CLIP-L half)",
    1280: "pick the ViT-bigG/14 encoder for SDXL's CLIP-G half",
}


# --------------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class FlexParams:
    """FlexDiffuse settings; defaults are the original's UI (HEAD sandbox) defaults.

    threshold_mult / threshold_floor: weight given to slots whose score reaches the floor.
    linear_start / linear_end: weight ramp from the first to the last position of a chunk.
    clustered: weight of the tent around score peaks (1 at peaks, 0 in the valleys between them).
    max_guidance: cap on the positive side of every weight. header_max: cap on |weight| of position 0
    (applied when < 1). priority / reuse: how image tokens are assigned to text positions.
    concept_threshold: match score above which a prompt token is replaced by a concept's image token.
    compatible: reproduce the original's quirks (see the module docstring).
    """

    threshold_mult: float = 0.25
    threshold_floor: float = 0.75
    linear_start: float = 0.1
    linear_end: float = 0.5
    clustered: float = 0.15
    max_guidance: float = 0.35
    header_max: float = 0.0
    priority: str = "best_fit"
    reuse: bool = True
    concept_threshold: float = 0.9
    compatible: bool = False

    _RANGES = (
        ("threshold_mult", -1.0, 1.0),
        ("linear_start", -1.0, 1.0),
        ("linear_end", -1.0, 1.0),
        ("clustered", -0.5, 0.5),
        ("max_guidance", 0.0, 1.0),
        ("header_max", 0.0, 1.0),
        ("threshold_floor", 0.0, 1.0),
        ("concept_threshold", 0.0, 1.0),
    )

    def validate(self) -> FlexParams:
        """Raise ArgumentError for the first value outside its range; return self."""
        for name, lo, hi in self._RANGES:
            value = getattr(self, name)
            allowed = f"a number from {lo:g} to {hi:g}"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ArgumentError(name, value, allowed)
            if not lo <= float(value) <= hi:  # also rejects NaN
                raise ArgumentError(name, value, allowed)
        if self.priority not in PRIORITIES:
            raise ArgumentError("priority", self.priority, "one of " + ", ".join(repr(p) for p in PRIORITIES))
        for name in ("reuse", "compatible"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentError(name, getattr(self, name), "True or False")
        return self

    @property
    def multipliers_zero(self) -> bool:
        """True when every weight source is 0, so guidance changes nothing (concepts aside)."""
        return self.threshold_mult == 0 and self.linear_start == 0 and self.linear_end == 0 and self.clustered == 0


# --------------------------------------------------------------------------------------------------
# Helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are computed in float32; float32/float64 stay as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _cpu64(x: torch.Tensor) -> torch.Tensor:
    """Small per-slot vectors are handled on the CPU in float64 (MPS has no float64)."""
    return x.detach().to(device="cpu").to(torch.float64)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows; a zero row stays zero instead of becoming NaN."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _check_priority(priority: str) -> None:
    if priority not in PRIORITIES:
        raise ArgumentError("priority", priority, "one of " + ", ".join(repr(p) for p in PRIORITIES))


def _dim_error(image_dim: int, text_dim: int, what: str = "image tokens") -> ImgcondError:
    hint = _ENCODER_HINT.get(text_dim, f"pick a CLIP vision encoder whose projection is {text_dim}-d")
    return ImgcondError(f"{what} are {image_dim}-d but the text embedding is {text_dim}-d: {hint}")


def _as_2d(x: torch.Tensor, name: str) -> torch.Tensor:
    """Accept (N, D) or (1, N, D)."""
    if not isinstance(x, torch.Tensor):
        raise ImgcondError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise ImgcondError(f"{name} must have shape (tokens, dim) or (1, tokens, dim), got {tuple(x.shape)}")
    return x


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ImgcondError(f"{name} contain NaN or infinite values; re-encode the input (try full precision)")


def similarity_scores(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """(I, T) scores s(i, t) = softmax over t of 100·cos(img_i, txt_t), in float32 or better."""
    dtype = _compute_dtype(torch.promote_types(img.dtype, txt.dtype))
    a = _unit(img.to(dtype))
    b = _unit(txt.to(device=img.device, dtype=dtype))
    return (SOFTMAX_TEMPERATURE * (a @ b.t())).softmax(dim=-1)
