"""Vision-encoder files: architecture read from tensor names and shapes (Hugging Face SigLIP and CLIP layouts).

:func:`detect_config` reads everything :class:`lib_imgcond.vision.transformer.VisionTransformer` needs from the shapes
alone (a file's header is enough: :func:`read_shapes`), and names what else a file is when it is not a vision encoder.
Nothing here touches the host program.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from lib_imgcond.common.errors import ImgcondError

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_P = "vision_model."
_PATCH_W = _P + "embeddings.patch_embedding.weight"
_PATCH_B = _P + "embeddings.patch_embedding.bias"
_POS = _P + "embeddings.position_embedding.weight"
_CLS = _P + "embeddings.class_embedding"
_PROJ = "visual_projection.weight"
_LAYER_RE = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")

# Attention heads cannot be read from the weights; every encoder we support uses 64-dim heads except so400m (72).
_HEADS = {1152: 16, 1024: 16, 1280: 16, 1664: 16, 768: 12}
# Standard input sizes: SigLIP-384 has 27 patches of 14 px and 6 unused pixels, so size ≠ grid·patch there.
_STANDARD_SIZES = (224, 256, 336, 384, 448, 512)
# Keys that may sit in a vision file but are not part of the vision tower (dropped before the strict check).
_IGNORED_PREFIXES = (
    _P + "head.",
    _P + "embeddings.position_ids",
    "text_model.",
    "text_projection.",
    "logit_scale",
    "logit_bias",
)

_EXPECTED_TEXT = {
    "siglip": "a SigLIP so400m vision encoder (sigclip_vision_patch14_384.safetensors)",
    "siglip-so400m-384": "a SigLIP so400m vision encoder (sigclip_vision_patch14_384.safetensors)",
    "clip": "a CLIP vision encoder with projection in Hugging Face format (e.g. CLIP-ViT-H-14.safetensors)",
    "clip-vit-l-14": "a CLIP ViT-L/14 vision encoder (clip_vision_l.safetensors)",
    "clip-vit-h-14": "a CLIP ViT-H/14 vision encoder (CLIP-ViT-H-14.safetensors)",
    "clip-vit-bigg-14": "a CLIP ViT-bigG/14 vision encoder (CLIP-ViT-bigG.safetensors)",
}
_OPENCLIP_EXPECTED = {
    1024: "clip_vision_l.safetensors (openai/clip-vit-large-patch14 in Hugging Face format)",
    1280: "CLIP-ViT-H-14.safetensors (h94/IP-Adapter, models/image_encoder)",
    1664: "CLIP-ViT-bigG.safetensors (h94/IP-Adapter, sdxl_models/image_encoder)",
}


@dataclass(frozen=True)
class VisionConfig:
    """Architecture of one vision encoder, as read from its tensor shapes."""

    kind: str  # "siglip" | "clip"
    hidden: int
    layers: int
    heads: int
    mlp: int
    image_size: int
    patch: int
    proj_dim: int | None  # CLIP projection width; None for SigLIP
    act: str  # "gelu_tanh" | "gelu" | "quick_gelu"
    name: str
    source: str = ""  # file name, used in error messages only

    @property
    def grid(self) -> int:
        """Patches per side (27 for SigLIP-384, 16 for CLIP at 224)."""
        return self.image_size // self.patch

    @property
    def num_positions(self) -> int:
        """Rows of the position embedding: patches, plus the class token for CLIP."""
        return self.grid**2 + (1 if self.kind == "clip" else 0)

    @property
    def layer_norm_eps(self) -> float:
        return 1e-6 if self.kind == "siglip" else 1e-5

    @property
    def mean(self) -> tuple[float, float, float]:
        return SIGLIP_MEAN if self.kind == "siglip" else CLIP_MEAN

    @property
    def std(self) -> tuple[float, float, float]:
        return SIGLIP_STD if self.kind == "siglip" else CLIP_STD


@dataclass
class VisionOutput:
    """What one forward pass returns. CLIP-only fields are None for SigLIP."""

    last_hidden_state: torch.Tensor  # SigLIP: post-LN (B, P², hidden); CLIP: pre-post-LN (B, 1+P², hidden)
    penultimate_hidden_states: torch.Tensor  # input of the last encoder layer (no post-LN)
    image_embeds: torch.Tensor | None = None  # CLIP: projection(post_LN(CLS)) (B, proj)
    projected_tokens: torch.Tensor | None = None  # CLIP: projection(post_LN(all tokens)) (B, 1+P², proj)


# ----------------------------------------------------------------------------------------------- detection


def _shape_of(value: object) -> tuple[int, ...]:
    shape = getattr(value, "shape", value)
    return tuple(int(d) for d in shape)  # type: ignore[union-attr]


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a .safetensors file without reading its data (for :func:`detect_config`)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def describe_keys(keys: Iterable[str]) -> str:
    """A short guess at what kind of file holds these tensor names (for error messages)."""
    keys = list(keys)
    if not keys:
        return "an empty file"

    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has("redux_down.") or has("redux_up."):
        return "a Flux Redux style model (redux_up/redux_down)"
    if has("style_embedding"):
        return "a T2I-Adapter style model (style_embedding)"
    if has("double_blocks.") or has("single_blocks."):
        return "a Flux diffusion model"
    if has("model.diffusion_model.") or has("input_blocks.") or has("down_blocks."):
        return "a Stable Diffusion checkpoint / UNet"
    if has("visual.transformer.resblocks.") or has("visual.trunk."):
        return "an OpenCLIP-format CLIP model"
    if has("vision_model."):
        return "a Hugging Face vision encoder"
    if has("text_model."):
        return "a CLIP text encoder"
    if has("encoder.block.") or "shared.weight" in keys:
        return "a T5 text encoder"
    if has("decoder.conv_in.") or has("first_stage_model."):
        return "a VAE"
    if has("image_proj.") or has("ip_adapter."):
        return "an IP-Adapter model"
    if has("lora_"):
        return "a LoRA"
    return f"an unrecognised file ({len(keys)} tensors, e.g. {', '.join(sorted(keys)[:3])})"


def _named(source: str) -> str:
    return source or "the file"


def _siglip_or_clip_name(kind: str, hidden: int, layers: int, patch: int, image: int) -> str:
    if kind == "siglip":
        if (hidden, layers) == (1152, 27):
            return f"siglip-so400m-{image}"
        return f"siglip-h{hidden}-l{layers}-{image}"
    base = {(1024, 24): "clip-vit-l", (1280, 32): "clip-vit-h", (1664, 48): "clip-vit-bigg"}.get((hidden, layers))
    if base is None:
        return f"clip-vit-h{hidden}-l{layers}-p{patch}-{image}"
    return f"{base}-{patch}" + ("" if image == 224 else f"-{image}")


def _image_size(grid: int, patch: int) -> int:
    for size in _STANDARD_SIZES:
        if size // patch == grid:
            return size
    return grid * patch


def _with_prefix(mapping: Mapping[str, object]) -> Mapping[str, object]:
    """transformers ≥ 5 saves a bare ``SiglipVisionModel`` without the ``vision_model.`` prefix; add it back."""
    if _PATCH_W in mapping or _PATCH_W[len(_P) :] not in mapping:
        return mapping
    return {(k if k == _PROJ else _P + k): v for k, v in mapping.items()}


def detect_config(state_dict_or_shapes: Mapping[str, object], source: str = "") -> VisionConfig:
    """Read the architecture of a Hugging Face SigLIP / CLIP vision encoder from tensor names and shapes.

    Values may be tensors or shapes. ``source`` (a file name) only appears in error messages.
    Raises :class:`ImgcondError` for OpenCLIP-format files and for anything that is not a vision encoder.
    """
    shapes = {k: _shape_of(v) for k, v in _with_prefix(state_dict_or_shapes).items()}
    what = _named(source)
    openclip = next((k for k in shapes if "visual.transformer.resblocks." in k or "visual.trunk." in k), None)
    if openclip is not None:
        width = next((s[-1] for k, s in shapes.items() if k.endswith("visual.transformer.resblocks.0.ln_1.weight")), 0)
        expected = _OPENCLIP_EXPECTED.get(width, "the Hugging Face-format vision encoder of the same model")
        raise ImgcondError(
            f"{what} is an OpenCLIP-format model ({openclip}, ...), which this extension does not convert; "
            f"use the Hugging Face-format file instead: {expected}"
        )
    if _PATCH_W not in shapes or not any(_LAYER_RE.match(k) for k in shapes):
        raise ImgcondError(
            f"{what} looks like {describe_keys(shapes)}, not a vision encoder: expected a Hugging Face SigLIP or "
            "CLIP vision model (vision_model.embeddings.patch_embedding.weight, vision_model.encoder.layers.N...)"
        )

    patch_shape = shapes[_PATCH_W]
    if len(patch_shape) != 4 or patch_shape[1] != 3 or patch_shape[2] != patch_shape[3]:
        raise ImgcondError(f"{what}: unexpected patch-embedding shape {patch_shape}, expected (hidden, 3, p, p)")
    hidden, patch = patch_shape[0], patch_shape[2]
    kind = "clip" if _CLS in shapes else "siglip"
    layers = 1 + max(int(m.group(1)) for m in map(_LAYER_RE.match, shapes) if m)
    fc1 = shapes.get(_P + "encoder.layers.0.mlp.fc1.weight")
    if fc1 is None or len(fc1) != 2 or fc1[1] != hidden:
        raise ImgcondError(f"{what}: missing or malformed vision_model.encoder.layers.0.mlp.fc1.weight")
    mlp = fc1[0]
    pos = shapes.get(_POS)
    if pos is None or len(pos) != 2 or pos[1] != hidden:
        raise ImgcondError(f"{what}: missing or malformed {_POS} (expected shape (positions, {hidden}))")
    patches = pos[0] - (1 if kind == "clip" else 0)
    grid = math.isqrt(patches)
    if grid * grid != patches or grid == 0:
        raise ImgcondError(f"{what}: {patches} patch positions do not form a square grid")
    heads = _HEADS.get(hidden, max(1, hidden // 64))
    if hidden % heads:
        raise ImgcondError(f"{what}: hidden size {hidden} is not divisible into {heads} attention heads")
    image = _image_size(grid, patch)

    proj_dim = None
    if kind == "clip":
        proj = shapes.get(_PROJ)
        if proj is None:
            raise ImgcondError(
                f"{what} is a CLIP vision model without visual_projection.weight; expected a "
                "CLIPVisionModelWithProjection file (e.g. CLIP-ViT-H-14.safetensors)"
            )
        if len(proj) != 2 or proj[1] != hidden:
            raise ImgcondError(f"{what}: visual_projection.weight has shape {proj}, expected (proj, {hidden})")
        proj_dim = proj[0]
        act = "quick_gelu" if (hidden, layers) in {(1024, 24), (768, 12)} else "gelu"  # OpenAI ViT-L/B use quick_gelu
    else:
        if _PATCH_B not in shapes:
            raise ImgcondError(f"{what}: SigLIP layout without {_PATCH_B}")
        act = "gelu_tanh"
    name = _siglip_or_clip_name(kind, hidden, layers, patch, image)
    return VisionConfig(kind, hidden, layers, heads, mlp, image, patch, proj_dim, act, name, source)


def expect_kind(cfg: VisionConfig, wanted: set[str] | frozenset[str], slot_label: str) -> None:
    """Raise a friendly error unless ``cfg.kind`` or ``cfg.name`` is in ``wanted`` (e.g. ``{"siglip"}``)."""
    if cfg.kind in wanted or cfg.name in wanted:
        return
    expected = " or ".join(_EXPECTED_TEXT.get(w, w) for w in sorted(wanted))
    raise ImgcondError(f"{slot_label}: {_named(cfg.source)} looks like {cfg.name}, expected {expected}")
