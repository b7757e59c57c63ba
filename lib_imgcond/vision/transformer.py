"""A compact vision transformer that loads Hugging Face SigLIP and CLIP vision-encoder files.

Two key layouts are understood (both use the ``vision_model.`` prefix of Hugging Face):

* **SigLIP** (``SiglipVisionModel``; Flux Redux uses so400m-patch14-384): the patch convolution has a bias, there is no
  class token and no pre-LayerNorm, the MLP uses tanh-GELU, and the post-LayerNorm is applied to *every* token. That
  normalised sequence is ``last_hidden_state`` (B, P², hidden). The attention-pooling ``head.*`` is not used.
* **CLIP** (``CLIPVisionModelWithProjection``; ViT-L/14, ViT-H/14, ViT-bigG/14): a class token, a bias-free patch
  convolution, a pre-LayerNorm (spelt ``pre_layrnorm`` in the files), and a ``visual_projection``. As in Hugging
  Face, ``last_hidden_state`` is the encoder output *without* the post-LayerNorm; ``image_embeds`` is the projected,
  post-normalised class token; ``projected_tokens`` applies post-LayerNorm and projection to every token.

Architecture numbers are read from tensor shapes (:func:`detect_config`, in :mod:`lib_imgcond.vision.config`),
so the same code builds the tiny test encoders and the full-size ones. Nothing here touches the host program.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.vision.config import _IGNORED_PREFIXES, VisionConfig, VisionOutput, _named, _with_prefix, detect_config

__all__ = ["VisionTransformer", "load_vision_model", "preprocess"]

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
            x = torch.cat([self.class_embedding.to(x).expand(x.shape[0], 1, -1), x], dim=1)
        pos = self.position_embedding.weight
        if x.shape[1] != pos.shape[0]:
            raise ImgcondError(
                f"the vision encoder expects {pos.shape[0]} tokens but the image gave {x.shape[1]}: "
                "preprocess the image to the encoder's input size first"
            )
        return x + pos.to(x)  # device too: a host may keep this parameter offloaded


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
