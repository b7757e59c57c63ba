"""A tiny DiT of one of Forge Neo's families, built from Neo's own class, behind Neo's UnetPatcher and sampler.

Imported by a check script that runs with the host's python from its folder (`refdrop_dit_check.py`); the family
comes from `--family`, its builder from `tests/e2e/tiny_dits/` (`tiny_dit.builders()[family]() -> Tiny`). Sampling is
Euler through the host's `sampling_function`, as `process_before_every_sampling` leaves the patcher clone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[2]
FORGE = Path.cwd()
_cli = argparse.ArgumentParser()
_cli.add_argument("--family", required=True)
OPTS, _rest = _cli.parse_known_args()
NEO = (FORGE / "modules_forge" / "packages").is_dir()
sys.argv = [sys.argv[0], "--cpu" if NEO else "--always-cpu"]  # the backend reads its flags from sys.argv at import
for extra in (REPO, FORGE, FORGE / "packages_3rdparty", FORGE / "modules_forge" / "packages"):
    sys.path.insert(0, str(extra))
sys.path.insert(0, str(FORGE / "repositories" / "huggingface_guess"))

import torch  # noqa: E402
from backend import args as backend_args  # noqa: E402
from backend import memory_management as mm  # noqa: E402
from backend.modules.k_prediction import PredictionDiscreteFlow  # noqa: E402
from backend.patcher.unet import UnetPatcher  # noqa: E402
from backend.sampling.sampling_function import sampling_function, sampling_prepare  # noqa: E402

from tests.e2e.tiny_dit import DTYPE, Tiny  # noqa: E402


def build_unet(tiny: Tiny) -> UnetPatcher:
    model = tiny.model.to(DTYPE).eval().requires_grad_(False)
    model.storage_dtype = model.computation_dtype = DTYPE
    model.load_device = mm.get_torch_device()
    model.initial_device = torch.device("cpu")
    model.offload_device = mm.unet_offload_device()
    settings = SimpleNamespace(sampling_settings={"shift": tiny.shift, "multiplier": 1.0})
    pred = PredictionDiscreteFlow(settings)
    backend_args.dynamic_args.ops = "ForgeOperations"  # what Neo's loader sets before building a KModel
    return UnetPatcher.from_model(model=model, diffusers_scheduler=None, k_predictor=pred,
                                  config=SimpleNamespace(memory_usage_factor=1.0))  # fmt: skip


def engine(tiny: Tiny, unet: UnetPatcher) -> Any:
    """A stand-in for the WebUI's `sd_model`: named as the family's engine class, holding the patcher."""
    return type(tiny.engine, (), {"forge_objects": SimpleNamespace(unet=unet)})()


def latent(tiny: Tiny, batch: int, w: int, h: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = tiny.downscale
    shape = (batch, tiny.channels, *((tiny.frames,) if tiny.frames else ()), h // d, w // d)
    return torch.randn(shape, generator=g).to(DTYPE)


def sample(pass_unet: UnetPatcher, tiny: Tiny, x: torch.Tensor, sigmas: torch.Tensor, cfg: float, cond, uncond):
    """Euler steps through the host's sampling_function; returns (final latent, per-step (cond, uncond) preds)."""
    batch = x.shape[0]
    denoiser = SimpleNamespace(
        inner_model=SimpleNamespace(inner_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=pass_unet))),
        p=SimpleNamespace(seeds=[1]),
    )
    sampling_prepare(pass_unet, x)
    preds = []
    for i in range(len(sigmas) - 1):
        params = SimpleNamespace(x=x, sigma=sigmas[i].repeat(batch), text_cond=cond, text_uncond=uncond,
                                 image_cond=None)  # fmt: skip
        den, cpred, upred = sampling_function(denoiser, params, cfg, [[(row, 1.0)] for row in range(batch)])
        preds.append((cpred, upred))
        x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x, preds
