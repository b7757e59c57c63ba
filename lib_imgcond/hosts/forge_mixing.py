"""Hires iterative mixing on Forge: mix the noised upscaled latent into the hires sampler's own state, once per step.

How: in the hires pass, `process_before_every_sampling` gets the upscaled first-pass latent (`x`) and the exact noise
Forge will use (`noise`). We replace this job's hires sampler's `func` (an instance attribute: the k-diffusion sampling
function that `launch_sampling` calls as `func(model, x, extra_args=..., callback=..., sigmas=...)`) by a wrapper that
builds a `HiresMixer` from the `sigmas` it is given (exactly the schedule the pass uses) and hands the original function
a proxy model. The proxy mixes the sampler's `x` in place before delegating to the real denoiser, so the sampler's
update uses the mixed state. With the `iterative_mixer` order the blend that follows the last step is applied to the
function's result (`HiresMixer.finish_`). Nothing global is patched: the wrapper lives on the sampler object, which
Forge drops after the pass.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from lib_imgcond.core.errors import ArgumentError, ImgcondError
from lib_imgcond.core.mixing import HiresMixer, MixParams
from lib_imgcond.hosts import forge
from lib_imgcond.log import logger

_MARK = "_imgcond_hrmix_orig"
# k-diffusion functions whose second-order sub-evaluation of step i-1 happens exactly at sigma_i (see HiresMixer)
_SUBSTEP_REPEATS = ("sample_heun", "restart_sampler")
# functions with 'sigmas' whose sub-evaluations at later schedule sigmas cannot be told apart from real steps
_UNSUPPORTED = {"sample_heunpp2": "HeunPP2 evaluates sub-steps at the next two schedule sigmas"}
_RESTART_OWN_SCHEDULE = 20  # Restart builds its own schedule from this many steps on


def mix_params(values: dict) -> MixParams:
    """MixParams from parsed spec values, validated; errors name the API argument (`hrmix.<name>`)."""
    fields = {name: values[name] for name in MixParams.__dataclass_fields__}
    try:
        return MixParams(**fields).validate()
    except ArgumentError as e:
        raise ArgumentError(f"hrmix.{e.name}", e.value, e.allowed) from None


def is_flow(sd_model: Any) -> bool:
    """True for flow-matching models (Flux, Chroma, SD3): their noise scaling is σ·ε + (1 − σ)·z."""
    if forge.model_family(sd_model) in ("flux", "chroma", "sd3"):
        return True
    unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    predictor = getattr(getattr(unet, "model", None), "predictor", None)
    return getattr(predictor, "prediction_type", None) == "const"


def original_func(sampler: Any) -> Any:
    """The sampler's sampling function without our wrapper."""
    func = getattr(sampler, "func", None)
    return getattr(func, _MARK, func)


def unsupported_reason(sampler: Any) -> str | None:
    """Why mixing cannot act on this sampler, or None when it can."""
    func = original_func(sampler)
    if not callable(func):
        return "the sampler has no k-diffusion sampling function"
    name = getattr(func, "__name__", "")
    if name in _UNSUPPORTED:
        return _UNSUPPORTED[name]
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return "its sampling function cannot be inspected"
    if "sigmas" not in params:
        return "it does not sample along a sigma schedule (timestep samplers DDIM/PLMS/UniPC, DPM fast/adaptive)"
    return None


class MixingModel:
    """Stands in for the sampler's denoiser: mixes x in place, then calls the real one. Everything else delegates."""

    def __init__(self, inner: Any, mixer: HiresMixer):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_mixer", mixer)

    def __call__(self, x, sigma, *args, **kwargs):
        self._mixer.mix_(x, sigma)
        return self._inner(x, sigma, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_inner"), name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


def install(
    p: Any,
    params: MixParams,
    z_up: Any,
    noise: Any,
    *,
    on_mixer=None,
) -> bool:
    """Wrap this hires pass's `p.sampler.func`. Idempotent: a previous wrapper of ours is replaced, never stacked.

    Returns False (and logs a warning) when the sampler is not supported; nothing is changed then.
    `on_mixer(mixer)` is called with each HiresMixer built (for logging and tests).
    """
    sampler = getattr(p, "sampler", None)
    reason = unsupported_reason(sampler) if sampler is not None else "there is no sampler"
    if reason:
        if sampler is not None and not getattr(sampler, "_imgcond_hrmix_warned", False):
            sampler._imgcond_hrmix_warned = True  # once per pass, not once per hook call
            name = getattr(p, "hr_sampler_name", None) or getattr(p, "sampler_name", "?")
            logger.warning("Hires iterative mixing does nothing with sampler '%s': %s; pick e.g. Euler", name, reason)
        return False
    if z_up is None or noise is None:
        raise ImgcondError("Hires iterative mixing: the hires pass gave no latent or noise to mix with")
    original = original_func(sampler)
    flow = is_flow(p.sd_model)
    repeats = getattr(original, "__name__", "") in _SUBSTEP_REPEATS
    restart = getattr(original, "__name__", "") == "restart_sampler"
    seeds = getattr(p, "seeds", None) or [getattr(p, "seed", 0)]
    seed = int(seeds[0]) if params.fresh_noise else None
    z_up, noise = z_up.detach().clone(), noise.detach().clone()

    @functools.wraps(original)
    def mixing_func(model, x, *args, **kwargs):
        sigmas = kwargs.get("sigmas", args[0] if args else None)
        if sigmas is None:
            return original(model, x, *args, **kwargs)
        if restart and len(sigmas) - 1 >= _RESTART_OWN_SCHEDULE:
            logger.warning(
                "Hires iterative mixing skipped: Restart replaces its schedule from %d steps on", _RESTART_OWN_SCHEDULE
            )
            return original(model, x, *args, **kwargs)
        mixer = HiresMixer(params, sigmas, z_up, noise, flow, seed, substep_repeats_sigma=repeats)
        if on_mixer is not None:
            on_mixer(mixer)
        out = original(MixingModel(model, mixer), x, *args, **kwargs)
        mixer.finish_(out)
        logger.debug("hires mixing: %d of %d steps mixed", len(mixer.mixed_steps), mixer.n_steps)
        return out

    setattr(mixing_func, _MARK, original)
    sampler.func = mixing_func
    return True


def pass_noise(p: Any, kwargs: dict) -> Any:
    """The noise the hires pass will use: another script's `p.modified_noise` wins over the hook's `noise`."""
    modified = getattr(p, "modified_noise", None)
    return modified if modified is not None else kwargs.get("noise")
