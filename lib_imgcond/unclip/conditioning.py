"""unCLIP conditioning of SD2.1-unclip-h / -l checkpoints: the UNet's ADM input `y` from CLIP image embeddings.

The checkpoint's noise augmentor (`noise_augmentor.*`: `data_mean`, `data_std` (1, D), and its 1000-step
`squaredcos_cap_v2` schedule, whose `alphas_cumprod` it may also store) noises the image embedding to a level, and a
sinusoidal embedding of that level (width D, cos half first) is appended: `y = [augment(e, level), emb(level)]`
(2·D = 2048 for -h with ViT-H/14's 1024-d embeds, 1536 for -l with ViT-L/14's 768-d).

    augment(e, t) = (√ᾱ_t · (e − μ)/σ + √(1 − ᾱ_t) · n) · σ + μ,   n ~ N(0, 1),  t = round(999 · noise_augmentation)

Several images: each gives `y_i · strength_i`; they are summed, and (as ComfyUI's unCLIPConditioning with more than
one image does) the embedding half of the sum is augmented once more at the merge level with a new level embedding.
The negative side gets a zero `y` (no image), as ComfyUI and the reference unCLIP sampling scripts give it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lib_imgcond.common.errors import ImgcondError

TIMESTEPS = 1000
PREFIX = "noise_augmentor."
MERGE_LEVEL = 0.05  # ComfyUI's default noise augmentation of a merged embedding


def squaredcos_alphas_cumprod(timesteps: int = TIMESTEPS, max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ_t of the `squaredcos_cap_v2` schedule (betas capped at `max_beta`), float64."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), max_beta) for i in range(timesteps)]
    return torch.cumprod(1.0 - torch.tensor(betas, dtype=torch.float64), dim=0)


def level_embedding(level: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) levels → (B, dim) sinusoidal embedding: [cos(t·f_k), sin(t·f_k)], f_k = max_period^(−k/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = level.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def level_of(noise_augmentation: float, timesteps: int = TIMESTEPS) -> int:
    return round((timesteps - 1) * float(noise_augmentation))


@dataclass(frozen=True)
class NoiseAugmentor:
    data_mean: torch.Tensor  # (1, D)
    data_std: torch.Tensor  # (1, D)
    alphas_cumprod: torch.Tensor  # (T,) float64

    @property
    def dim(self) -> int:
        return int(self.data_mean.shape[-1])

    def __call__(self, embeds: torch.Tensor, level: int, generator: torch.Generator) -> torch.Tensor:
        """(B, D) embeds → (B, 2·D) = [noised embeds, level embedding]."""
        x = embeds.float()
        if x.ndim != 2 or x.shape[1] != self.dim:
            shape = tuple(x.shape)
            raise ImgcondError(f"unCLIP: image embeds of shape {shape}, the checkpoint expects (B, {self.dim})")
        if not 0 <= level < self.alphas_cumprod.numel():
            raise ImgcondError(f"unCLIP: noise level {level} outside 0…{self.alphas_cumprod.numel() - 1}")
        a = self.alphas_cumprod[level]
        mean, std = self.data_mean.float(), self.data_std.float()
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        scaled = (x - mean) / std
        noised = (float(a.sqrt()) * scaled + float((1 - a).sqrt()) * noise) * std + mean
        emb = level_embedding(torch.full((x.shape[0],), level), self.dim)
        return torch.cat([noised, emb], dim=1)


def noise_augmentor(state: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> NoiseAugmentor:
    """The noise augmentor from a checkpoint's tensors (`noise_augmentor.*`; other keys ignored)."""
    mean, std = state.get(PREFIX + "data_mean"), state.get(PREFIX + "data_std")
    if mean is None or std is None:
        raise ImgcondError(
            f"{source} has no unCLIP noise augmentor ({PREFIX}data_mean / data_std): it is not an SD2.1 unCLIP "
            "checkpoint (sd21-unclip-h / -l)"
        )
    mean, std = mean.float().reshape(1, -1), std.float().reshape(1, -1)
    if mean.shape != std.shape or not bool((std > 0).all()):
        raise ImgcondError(f"{source}: the noise augmentor's data_mean / data_std are malformed")
    stored = state.get(PREFIX + "alphas_cumprod")
    acp = stored.double().flatten() if stored is not None else squaredcos_alphas_cumprod()
    return NoiseAugmentor(mean, std, acp)


def adm(
    augmentor: NoiseAugmentor,
    images: Sequence[tuple[torch.Tensor, float, float]],
    generator: torch.Generator,
    merge_level: float = MERGE_LEVEL,
) -> torch.Tensor:
    """The positive `y` (1, 2·D) from (image embeds (1, D), strength, noise_augmentation) per image."""
    if not images:
        raise ImgcondError("unCLIP: no image to condition on")
    parts = [augmentor(e, level_of(aug), generator) * float(s) for e, s, aug in images]
    if len(parts) == 1:
        return parts[0]
    total = torch.stack(parts).sum(0)
    return augmentor(total[:, : augmentor.dim], level_of(merge_level), generator)
