"""Which WebUI runs the extension, found once from what it can do (never from version strings).

Every adapter asks `capabilities()` instead of probing on its own, so Forge 2.0 and Forge Neo differ in this file only:

* `patcher`: Forge's `UnetPatcher` (`backend.patcher.unet`) exists. Without it (AUTOMATIC1111, reForge) none of the
  techniques can patch a model, and each one refuses with `NEEDS_FORGE` instead of silently doing nothing.
* `flux_attention_mask`: the Flux blocks' `attention(q, k, v, pe, mask=…, transformer_options=…)` takes a mask and the
  transformer options (Forge Neo); Forge 2.0's is `attention(q, k, v, pe)`. Redux's attention bias then goes through
  the host's own attention (its RoPE and kernel) with a mask, instead of our RoPE + SDPA.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any

from lib_imgcond.core.errors import ImgcondError

NEEDS_FORGE = "needs Stable Diffusion WebUI Forge or Forge Neo"


@dataclass(frozen=True)
class Capabilities:
    patcher: bool
    flux_attention_mask: bool = False

    @property
    def name(self) -> str:
        if not self.patcher:
            return "a WebUI without Forge's model patcher"
        return "Forge Neo" if self.flux_attention_mask else "Forge"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


def _takes(module: str, function: str, *names: str) -> bool:
    try:
        fn = getattr(importlib.import_module(module), function)
        params = inspect.signature(fn).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
    return all(n in params for n in names)


def probe() -> Capabilities:
    """Look at the running WebUI (imports only what Forge has already imported at start-up)."""
    patcher = _importable("backend.patcher.unet")
    return Capabilities(
        patcher=patcher,
        flux_attention_mask=patcher and _takes("backend.nn.flux", "attention", "mask", "transformer_options"),
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
