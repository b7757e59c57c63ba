"""Hires iterative mixing on Forge: mix the noised upscaled latent into the hires sampler's own state, once per step.

How: in the hires pass, `process_before_every_sampling` gets the upscaled first-pass latent (`x`) and the exact noise
Forge will use (`noise`). We replace this job's hires sampler's `func` (an instance attribute: the k-diffusion sampling
function that `launch_sampling` calls as `func(model, x, extra_args=..., callback=..., sigmas=...)`) by a wrapper that
builds a `HiresMixer` from the `sigmas` it is given (exactly the schedule the pass uses) and hands the original function
a proxy model. The proxy mixes the sampler's `x` in place before delegating to the real denoiser, so the sampler's
update uses the mixed state. With the `iterative_mixer` order the blend that follows the last step is applied to the
function's result (`HiresMixer.finish_`). With rewind the wrapper calls the original function once per rewind round
(`mixed_sampling`), over the tail of the schedule, from the re-noised result. Nothing global is patched: the wrapper
lives on the sampler object, which Forge drops after the pass.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.common.log import logger
from lib_imgcond.host import forge
from lib_imgcond.mixing.mixer import HiresMixer, mixed_sampling
from lib_imgcond.mixing.schedules import MixParams
from lib_imgcond.spec.families import HRMIX

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


# The families whose hires pass the mixer reproduces. What it needs: the pass's sampler state is the tensor the hook
# gives as `x` (any (B, C, …) shape: 4-D image latents, Wan-VAE families' (B, C, T, H, W), all mixed per batch item),
# the schedule is the `sigmas` the sampling function gets, and the state at σ is the predictor's `noise_scaling`:
# `z + σ·ε` for the SD UNets' discrete eps/v predictors, `σ·ε + (1 − σ)·z` for every "const" predictor (Neo's
# PredictionDiscreteFlow and PredictionFlux, whatever their shift or timestep multiplier, e.g. ERNIE-Image's 1000:
# they change the timestep the model sees, not σ). Every family Neo loads samples that way; PiD is refused because Neo
# runs it in img2img only, so it never has a hires pass (the reason is in spec/families.py).
FAMILIES = (
    "sd15", "sd2", "sdxl", "sdxl_refiner", "sd3", "flux", "chroma", "flux2", "qwen_image", "zimage", "wan", "lumina2",
    "anima", "krea2", "mugen", "ernie_image",
)  # fmt: skip
# families whose model is a flow model (used when the predictor cannot be read)
_FLOW = frozenset(FAMILIES) - {"sd15", "sd2", "sdxl", "sdxl_refiner"}


def check_model(p: Any) -> None:
    forge.require_family(p.sd_model, FAMILIES, "Hires iterative mixing", HRMIX.reason)


def is_flow(sd_model: Any) -> bool:
    """True when the model's predictor noises as σ·ε + (1 − σ)·z (prediction type "const": Flux, Chroma, SD3, Neo's
    DiTs, SDXL with a rectified-flow predictor); from the family when the predictor cannot be read."""
    unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    predictor = getattr(getattr(unet, "model", None), "predictor", None)
    kind = getattr(predictor, "prediction_type", None)
    if kind is not None:
        return kind == "const"
    return forge.model_family(sd_model) in _FLOW


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


def _offset_callback(callback, start: int):
    """The sampler's step callback with `i` counted from the whole pass's start (for a rewind round from `start`)."""

    def offset(d):
        return callback({**d, "i": d["i"] + start} if isinstance(d, dict) and "i" in d else d)

    return offset


class _StepCounter:
    """Keeps Forge's CFGDenoiser `step` (model calls so far; prompt editing reads it) in line with rewind rounds."""

    def __init__(self, model: Any, n_steps: int):
        self.model, self.n_steps = model, n_steps
        self.first = getattr(model, "step", None)
        self.per_step = 1.0

    def _readable(self) -> bool:
        step = getattr(self.model, "step", None)
        return isinstance(step, int) and not isinstance(step, bool) and isinstance(self.first, int)

    def measure(self) -> None:
        """After the first round: model calls per step (2 for Heun, …)."""
        if self._readable() and self.n_steps:
            self.per_step = max(1.0, (self.model.step - self.first) / self.n_steps)

    def rewind_to(self, start: int) -> None:
        if self._readable():
            self.model.step = self.first + round(start * self.per_step)


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
    `on_mixer(mixer)` is called with each HiresMixer built, one per pass and rewind round (for logging and tests).
    """
    sampler = getattr(p, "sampler", None)
    reason = unsupported_reason(sampler) if sampler is not None else "there is no sampler"
    if reason:
        if sampler is not None and not getattr(sampler, "_imgcond_hrmix_warned", False):
            sampler._imgcond_hrmix_warned = True  # once per pass, not once per hook call
            name = getattr(p, "hr_sampler_name", None) or getattr(p, "sampler_name", "?")
            forge.warn(p, f"Hires iterative mixing does nothing with sampler '{name}': {reason}; pick e.g. Euler")
        return False
    if z_up is None or noise is None:
        raise ImgcondError("Hires iterative mixing: the hires pass gave no latent or noise to mix with")
    original = original_func(sampler)
    flow = is_flow(p.sd_model)
    repeats = getattr(original, "__name__", "") in _SUBSTEP_REPEATS
    restart = getattr(original, "__name__", "") == "restart_sampler"
    seeds = getattr(p, "seeds", None) or [getattr(p, "seed", 0)]
    seed = int(seeds[0]) if params.fresh_noise or params.rewind else None
    z_up, noise = z_up.detach().clone(), noise.detach().clone()
    if z_up.shape[0] == 1 < noise.shape[0] and z_up.shape[1:] == noise.shape[1:]:
        # one latent for a batch (Neo's Qwen-Image VAE encode keeps the first image): the host's noise_scaling
        # broadcasts it over the batch's noise, and so does the mixer
        z_up = z_up.expand_as(noise).clone()

    @functools.wraps(original)
    def mixing_func(model, x, *args, **kwargs):
        sigmas = kwargs.get("sigmas", args[0] if args else None)
        if sigmas is None:
            return original(model, x, *args, **kwargs)
        if restart and len(sigmas) - 1 >= _RESTART_OWN_SCHEDULE:
            forge.warn(
                p,
                f"Hires iterative mixing skipped: Restart replaces its schedule from {_RESTART_OWN_SCHEDULE} steps on",
            )
            return original(model, x, *args, **kwargs)
        n = len(sigmas) - 1
        counter = _StepCounter(model, n)

        def sample(mixer: HiresMixer, x_in, part, start: int):
            part_args, part_kwargs = list(args), dict(kwargs)
            if "sigmas" in part_kwargs:
                part_kwargs["sigmas"] = part
            else:
                part_args[0] = part
            if start:  # a rewind round: progress and prompt-editing steps continue from `start`, not from the end
                callback = part_kwargs.get("callback")
                if callback is not None:
                    part_kwargs["callback"] = _offset_callback(callback, start)
                counter.rewind_to(start)
            out = original(MixingModel(model, mixer), x_in, *part_args, **part_kwargs)
            if not start:
                counter.measure()
            logger.debug("hires mixing from step %d: %d of %d steps mixed", start, len(mixer.mixed_steps), n - start)
            return out

        return mixed_sampling(
            sample, x, sigmas, params, z_up, noise, flow, seed, substep_repeats_sigma=repeats, on_mixer=on_mixer
        )

    setattr(mixing_func, _MARK, original)
    sampler.func = mixing_func
    return True


def pass_noise(p: Any, kwargs: dict) -> Any:
    """The noise the hires pass will use: another script's `p.modified_noise` wins over the hook's `noise`."""
    modified = getattr(p, "modified_noise", None)
    return modified if modified is not None else kwargs.get("noise")
