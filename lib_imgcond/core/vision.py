"""A compact vision transformer that loads Hugging Face SigLIP and CLIP vision-encoder files.

Two key layouts are understood (both use the ``vision_model.`` prefix of Hugging Face):

* **SigLIP** (``SiglipVisionModel``; Flux Redux uses so400m-patch14-384): the patch convolution has a bias, there is no
  class token and no pre-LayerNorm, the MLP uses tanh-GELU, and the post-LayerNorm is applied to *every* token. That
  normalised sequence is ``last_hidden_state`` (B, P², hidden). The attention-pooling ``head.*`` is not used.
* **CLIP** (``CLIPVisionModelWithProjection``; ViT-L/14, ViT-H/14, ViT-bigG/14): a class token, a bias-free patch
  convolution, a pre-LayerNorm (spelt ``pre_layrnorm`` in the files), and a ``visual_projection``. As in Hugging
  Face, ``last_hidden_state`` is the encoder output *without* the post-LayerNorm; ``image_embeds`` is the projected,
  post-normalised class token; ``projected_tokens`` applies post-LayerNorm and projection to every token.

Architecture numbers are read from tensor shapes (:func:`detect_config`), so the same code builds the tiny test
encoders and the full-size ones. Nothing here touches the host program.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lib_imgcond.core.errors import ArgumentError, ImgcondError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "VisionConfig",
    "VisionOutput",
    "VisionTransformer",
    "describe_keys",
    "detect_config",
    "expect_kind",
    "load_vision_model",
    "preprocess",
    "read_shapes",
]

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


# ----------------------------------------------------------------------------------------------- model


def _activation(name: str):
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    raise ArgumentError("act", name, "'gelu_tanh', 'gelu' or 'quick_gelu'")


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class _MLP(nn.Module):
    def __init__(self, hidden: int, mlp: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp)
        self.fc2 = nn.Linear(mlp, hidden)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.self_attn = _Attention(cfg.hidden, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.mlp = _MLP(cfg.hidden, cfg.mlp, cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        clip = cfg.kind == "clip"
        if clip:
            self.class_embedding = nn.Parameter(torch.empty(cfg.hidden))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden, cfg.patch, stride=cfg.patch, bias=not clip)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, P², hidden), raster order
        if hasattr(self, "class_embedding"):
            x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        pos = self.position_embedding.weight
        if x.shape[1] != pos.shape[0]:
            raise ImgcondError(
                f"the vision encoder expects {pos.shape[0]} tokens but the image gave {x.shape[1]}: "
                "preprocess the image to the encoder's input size first"
            )
        return x + pos.to(x.dtype)


class _Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.layers))


class _Tower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        if cfg.kind == "clip":
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)  # sic: the files spell it so
        self.encoder = _Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)


class VisionTransformer(nn.Module):
    """SigLIP or CLIP vision tower whose parameter names match the Hugging Face files.

    Construct under ``with torch.device("meta"):`` to inspect shapes without memory; use
    :func:`load_vision_model` to get one with weights. ``forward`` takes *normalised* pixels at
    ``config.image_size`` (see :func:`preprocess`); :meth:`encode` does both steps.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = _Tower(cfg)
        if cfg.kind == "clip":
            self.visual_projection = nn.Linear(cfg.hidden, cfg.proj_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> VisionOutput:
        tower = self.vision_model
        x = tower.embeddings(pixel_values.to(tower.embeddings.patch_embedding.weight.dtype))
        if self.config.kind == "clip":
            x = tower.pre_layrnorm(x)
        penultimate = x
        for layer in tower.encoder.layers:
            penultimate = x
            x = layer(x)
        if self.config.kind == "siglip":
            return VisionOutput(tower.post_layernorm(x), penultimate)
        projected = self.visual_projection(tower.post_layernorm(x))
        return VisionOutput(x, penultimate, image_embeds=projected[:, 0], projected_tokens=projected)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> VisionOutput:
        """Preprocess (B,3,H,W) images in [0,1] and run the encoder, without autograd."""
        param = self.vision_model.embeddings.patch_embedding.weight
        return self(preprocess(images, self.config).to(param.device))


# ----------------------------------------------------------------------------------------------- loading


def _is_ignored(key: str) -> bool:
    return key.startswith(_IGNORED_PREFIXES)


def _few(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_vision_model(
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    source: str = "",
) -> VisionTransformer:
    """Build a :class:`VisionTransformer` from a state dict in the Hugging Face layout (strict).

    Keys without the ``vision_model.`` prefix (bare SigLIP saved by transformers ≥ 5) are accepted.
    The SigLIP pooling head, ``position_ids`` and the text half of a full CLIP/SigLIP model are ignored;
    any other missing, unexpected or wrongly shaped tensor raises :class:`ImgcondError`.
    """
    cfg = detect_config(state_dict, source)
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: v for k, v in _with_prefix(state_dict).items() if not _is_ignored(k)}
    missing, unexpected = expected.keys() - given.keys(), given.keys() - expected.keys()
    what = _named(source)
    if missing or unexpected:
        parts = [f"missing {_few(missing)}" if missing else "", f"unexpected {_few(unexpected)}" if unexpected else ""]
        raise ImgcondError(f"{what} does not match the {cfg.name} layout: " + "; ".join(p for p in parts if p))
    wrong = [
        f"{k} {tuple(v.shape)} (expected {expected[k]})" for k, v in given.items() if tuple(v.shape) != expected[k]
    ]
    if wrong:
        raise ImgcondError(f"{what} has tensors of the wrong shape for {cfg.name}: {_few(wrong, 3)}")
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in given.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------- preprocessing


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)


def preprocess(images: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """(B,3,H,W) float images in [0,1] → normalised float32 pixels at ``cfg.image_size``².

    SigLIP: squashed to the square input size if it is not already (Redux callers pass images already prepared
    at that size); CLIP: the short side is scaled to the input size and the centre cropped. Both use bicubic
    resampling with antialiasing, clamp to [0,1] and quantise to 8 bits (as ComfyUI and Forge do) before the
    mean/std normalisation.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ArgumentError("images", shape, "a (B, 3, H, W) tensor")
    size = cfg.image_size
    x = images.float()
    h, w = x.shape[-2:]
    if cfg.kind == "siglip":
        x = _resize(x, (size, size))
    else:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = _resize(x, (nh, nw))
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, :, top : top + size, left : left + size]
    x = torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0
    mean = torch.tensor(cfg.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
