"""Which WebUI runs the extension, found once from what it can do (never from version strings).

Every adapter asks `capabilities()` instead of probing on its own, so Forge 2.0 and Forge Neo differ in this file only:

* `patcher`: Forge's `UnetPatcher` (`backend.patcher.unet`) exists. Without it (AUTOMATIC1111, reForge) none of the
  techniques can patch a model, and each one refuses with `NEEDS_FORGE` instead of silently doing nothing.
* `flux_block_replace`: the Flux forward takes `transformer_options` and so honours its
  `patches_replace["dit"]` block replaces, whose blocks take an `attn_mask` (Forge Neo). Forge 2.0's Flux has no
  patch point inside the model: there a module function is swapped for one model call instead.
* `model_management`: `backend.memory_management.load_models_gpu` and `backend.patcher.base.ModelPatcher` exist (both
  hosts), so the vision encoders are wrapped in a ModelPatcher and loaded / offloaded by the host like its own models.
* `full_load_flag`: `load_models_gpu` takes `force_full_load` (Forge Neo). Neo may otherwise load a model partially and
  leave plain torch layers on the CPU; Forge 2.0 always moves plain layers to the GPU.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any

from lib_imgcond.common.errors import ImgcondError

NEEDS_FORGE = "needs Stable Diffusion WebUI Forge or Forge Neo"


@dataclass(frozen=True)
class Capabilities:
    patcher: bool
    flux_block_replace: bool = False
    model_management: bool = False
    full_load_flag: bool = False

    @property
    def name(self) -> str:
        if not self.patcher:
            return "a WebUI without Forge's model patcher"
        return "Forge Neo" if self.flux_block_replace else "Forge"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


def _takes(module: str, path: str, *names: str) -> bool:
    """Whether `module`'s callable at dotted `path` has every parameter in `names`."""
    try:
        fn = importlib.import_module(module)
        for part in path.split("."):
            fn = getattr(fn, part)
        params = inspect.signature(fn).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
    return all(n in params for n in names)


def probe() -> Capabilities:
    """Look at the running WebUI (imports only what Forge has already imported at start-up)."""
    patcher = _importable("backend.patcher.unet")
    managed = (
        patcher
        and _takes("backend.memory_management", "load_models_gpu", "models")
        and _importable("backend.patcher.base")
    )
    return Capabilities(
        patcher=patcher,
        flux_block_replace=patcher
        and _takes("backend.nn.flux", "IntegratedFluxTransformer2DModel.forward_orig", "transformer_options"),
        model_management=managed,
        full_load_flag=managed and _takes("backend.memory_management", "load_models_gpu", "force_full_load"),
    )


@functools.cache
def capabilities() -> Capabilities:
    """The probe, run once per process."""
    return probe()


def require_forge(p: Any, technique: str) -> None:
    """Raise the clear refusal when this WebUI (or this job's model) has no Forge patcher."""
    if capabilities().patcher and getattr(getattr(p, "sd_model", None), "forge_objects", None) is not None:
        return
    raise ImgcondError(
        f"{technique} {NEEDS_FORGE}: this WebUI has no Forge model patcher, so it cannot be applied. "
        f"Turn {technique} off, or run it in Forge / Forge Neo."
    )


def notice(technique: str) -> str | None:
    """The one line an accordion shows where the technique cannot run, else None."""
    if capabilities().patcher:
        return None
    return f"⚠️ {technique} {NEEDS_FORGE}; on this WebUI it stops the generation with a message instead of running."
