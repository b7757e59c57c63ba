"""What a tiny DiT of one family is (`Tiny`), its random weights, and where each family's builder lives.

Torch only: the e2e tests list the families from here without importing the host; a builder imports the host's class
when it is called (from a script run with the host's python, `dit_backend.py`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPE = torch.float32


@dataclass
class Tiny:
    """A tiny model of one family: the model, its latent channels, and its conditioning for a batch."""

    engine: str  # the class name of the family's diffusion engine (how `host.forge.model_family` knows it)
    model: Any
    channels: int
    cond: Callable[[int, int], Any]  # (batch, seed) -> what the engine's get_learned_conditioning returns
    frames: int = 0  # families with a 5-D latent (B, C, T, H, W): its frames (1 for an image)
    downscale: int = 8  # image pixels per latent pixel (1: the latent is the image itself, as PiD's)
    shift: float = 3.0
    multiplier: float = 1.0  # the flow predictor's timestep multiplier (the model config's `sampling_settings`)
    # the image tokens' (start, end) in the first attention call of a model call, read from the host's own
    # intermediates (e.g. the caption length its patchify returns): checks the site's span rule
    host_span: Callable[[Any, torch.Tensor, Any], tuple[int, int]] | None = None
    # edit models (reference latents appended to the image tokens): `edit(latents)` is a context in which the model
    # calls carry those latents the way the engine passes them; `split_output(output, n)` splits the output of the
    # first attention module into (the generated image's n tokens, every other token), by the host's output layout
    edit: Callable[[list[torch.Tensor]], AbstractContextManager] | None = None
    split_output: Callable[[Any, int], tuple[torch.Tensor, torch.Tensor]] | None = None
    # (batch) -> keyword arguments added to every model call, as another extension would add them (Krea 2's
    # ref_latents); a model-function wrapper set on the patcher before RefDrop's
    call_kwargs: Callable[[int], dict] | None = None
    refused_frames: int = 0  # a latent frame count RefDrop refuses on this family (checked: a clear error); 0: none
    engine_attrs: dict[str, Any] = field(default_factory=dict)  # flags the engine has (e.g. Neo's `is_wan`)
    # a host state under which a model call of latent x carries tokens besides the image's (Anima: Neo's reference
    # latent): the span is checked under it too, and a same-seed Record → Use under it must give the plain image
    extra_tokens: Callable[[torch.Tensor], AbstractContextManager] | None = None
    clip_frames: int = 0  # a video family: the latent frames of its multi-frame checks (0: none)


def builders() -> dict[str, Callable[[], Tiny]]:
    """Builder name -> builder: the family key, or a variant of a family ('krea2_refs'; its family comes from the
    Tiny's engine)."""
    out: dict[str, Callable[[], Tiny]] = {}
    folder = Path(__file__).with_name("tiny_dits")
    for info in pkgutil.iter_modules([str(folder)]):
        mod = importlib.import_module(f"tests.e2e.tiny_dits.{info.name}")
        out.update(mod.BUILDERS)
    return out


def init_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights that keep activations of order one through a few blocks; every norm's weight near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * mod.in_features**-0.5)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.02)
            elif isinstance(mod, torch.nn.Conv2d | torch.nn.Conv3d):
                fan = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * fan**-0.5)
        for name, prm in model.named_parameters():
            if prm.ndim == 1 and ("norm" in name.lower() or "scale" in name.lower()):
                prm.copy_(1.0 + 0.1 * torch.randn(prm.shape, generator=g))
            elif prm.ndim >= 1 and torch.count_nonzero(prm) == 0:  # pad tokens, zero-initialised gates
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.1)
    return model
