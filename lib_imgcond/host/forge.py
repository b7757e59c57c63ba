"""Adapters between the pure core and Stable Diffusion WebUI Forge.

Everything that touches Forge objects (`p`, `p.sd_model.forge_objects.unet`, the sampler) lives here. Forge modules are
imported lazily so the glue tests can run against small fakes of the documented API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.common.log import logger

FAMILY_LABELS = {
    "sd15": "SD1.5",
    "sd2": "SD2.x",
    "sdxl": "SDXL",
    "sdxl_refiner": "SDXL refiner",
    "sd3": "SD3",
    "flux": "Flux",
    "chroma": "Chroma",
    "flux2": "Flux.2 (Klein)",
    "qwen_image": "Qwen-Image",
    "zimage": "Z-Image",
    "wan": "Wan",
    "lumina2": "Lumina 2",
    "anima": "Anima",
    "krea2": "Krea 2",
    "mugen": "Mugen",
    "ernie_image": "ERNIE-Image",
    "pid": "PiD",
    "other": "an unknown architecture",
}

# Diffusion-engine class names of Forge 2.0 and Forge Neo. The engine's class, not its transformer's, tells the
# families apart: Neo's Flux.2 Klein runs on the same `IntegratedFluxTransformer2DModel` as Flux.1, and Mugen
# sets `is_sdxl` without being SDXL.
ENGINE_FAMILIES = {
    "StableDiffusion": "sd15",
    "StableDiffusion2": "sd2",
    "StableDiffusionXL": "sdxl",
    "StableDiffusionXLRefiner": "sdxl_refiner",
    "StableDiffusion3": "sd3",
    "Flux": "flux",
    "Chroma": "chroma",
    "Flux2": "flux2",
    "QwenImage": "qwen_image",
    "ZImage": "zimage",
    "Wan": "wan",
    "Lumina2": "lumina2",
    "Anima": "anima",
    "Krea2": "krea2",
    "Mugen": "mugen",
    "ErnieImage": "ernie_image",
    "PiD": "pid",
}

_STATE_ATTR = "_imgcond_state"


def model_family(sd_model: Any) -> str:
    """A key of FAMILY_LABELS: from the engine's class name, else (an engine we do not know) from its flags."""
    family = ENGINE_FAMILIES.get(type(sd_model).__name__)
    if family is not None:
        return family
    for flag, name in (("is_sdxl", "sdxl"), ("is_sd1", "sd15"), ("is_sd2", "sd2"), ("is_sd3", "sd3")):
        if getattr(sd_model, flag, False):
            return name
    return "other"


def require_family(
    sd_model: Any, allowed: tuple[str, ...], technique: str, reason: Callable[[str], str] | None = None
) -> str:
    """Return the model family, or raise a clear error when `technique` does not support it: the error names the
    families it needs, the loaded one and, from `reason(family)`, why that one is refused."""
    family = model_family(sd_model)
    if family not in allowed:
        labels = [FAMILY_LABELS[f] for f in allowed]
        wanted = f"{', '.join(labels[:-1])} or {labels[-1]}" if len(labels) > 1 else labels[0]
        why = f": {reason(family)}" if reason is not None else ""
        raise ImgcondError(
            f"{technique} needs a {wanted} model, but the loaded checkpoint is {FAMILY_LABELS[family]}{why}. "
            f"Load such a checkpoint or turn {technique} off."
        )
    return family


def pass_name(p: Any) -> str:
    """'hires' inside the hires-fix second pass, else 'first'."""
    return "hires" if getattr(p, "is_hr_pass", False) else "first"


def job_state(p: Any, key: str, factory: Callable[[], Any]) -> Any:
    """Per-job state kept on the processing object (so it dies with the job): created once, then reused by every hook
    call of this job, including the two hires-pass calls of `process_before_every_sampling`."""
    state = p.__dict__.setdefault(_STATE_ATTR, {})
    if key not in state:
        state[key] = factory()
    return state[key]


def drop_job_state(p: Any, key: str) -> None:
    p.__dict__.get(_STATE_ATTR, {}).pop(key, None)


def patch_unet(p: Any, apply: Callable[[Any], None]) -> Any:
    """Clone the current UnetPatcher, let `apply` patch the clone, and install it for this sampling pass only.

    Forge rebuilds `forge_objects` from its after-LoRA copy before every pass, so nothing outlives the pass. Calling
    this again (the second `process_before_every_sampling` of a hires pass) patches a fresh clone: idempotent.
    """
    unet = p.sd_model.forge_objects.unet.clone()
    apply(unet)
    p.sd_model.forge_objects.unet = unet
    return unet


def abort_generation(p: Any, error: Exception) -> None:
    """Stop this job before it samples, surfacing `error` to the UI and the API. Call it from `process()`: once
    sampling has begun, use `refuse_sampling` on the pass's patcher instead.

    Forge catches exceptions raised by script hooks and carries on, which would silently produce an image without the
    requested effect. Replacing the job's `sample` method (instance attribute, dies with `p`) makes the error reach
    the user instead, before any sampling work.
    """

    raised = user_error(error)

    def refuse(*_args, **_kwargs):
        raise raised

    p.sample = refuse


def user_error(error: Exception) -> Exception:
    """`error` as an HTTP 400 error of the web server as well (a `fastapi.HTTPException` keeping the class name and
    the message): the API answers 400 with `{"detail": message}`, and the server logs no traceback for it. Outside a
    WebUI (no fastapi) `error` itself."""
    try:
        from fastapi import HTTPException
    except ImportError:
        return error
    base = type(error)
    if isinstance(error, HTTPException):
        return error
    cls = _USER_ERRORS.get((base, HTTPException))
    if cls is None:

        def __init__(self, message: str):
            Exception.__init__(self, message)
            self.status_code, self.detail, self.headers = 400, message, None

        def __str__(self):
            return self.detail

        cls = type(base.__name__, (base, HTTPException), {"__init__": __init__, "__str__": __str__})
        cls.__module__ = base.__module__
        _USER_ERRORS[base, HTTPException] = cls
    return cls(str(error))


_USER_ERRORS: dict[tuple[type, type], type] = {}


def http_route(fn: Callable) -> Callable:
    """Decorate a route handler of ours: an ImgcondError (bad request) answers HTTP 400 with a JSON body
    `{"detail": message}` and is logged in one line, with no traceback."""
    import functools

    @functools.wraps(fn)
    def handler(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ImgcondError as e:
            logger.error("%s", e)
            raise user_error(e) from None

    return handler


NOTICE_KEY = "ImgCond notices"


def notify(processed: Any, text: str) -> None:
    """Show `text` with the result, from `postprocess`: under the image in the UI (the job's comments) and in the
    API's `info` (`extra_generation_params["ImgCond notices"]`; the infotexts are already written, so no PNG
    carries it)."""
    processed.comments = f"{getattr(processed, 'comments', '') or ''}{text}\n"
    params = getattr(processed, "extra_generation_params", None)
    if isinstance(params, dict):
        params.setdefault(NOTICE_KEY, []).append(text)


def warn(p: Any, text: str) -> None:
    """A warning that changes the result, from a hook that runs before the infotext is written: logged, shown under
    the image (the job's comments) and in the infotext and the API's `info` (`ImgCond notices`)."""
    logger.warning("%s", text)
    comment = getattr(p, "comment", None)
    if callable(comment):
        comment(text)
    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict):
        old = params.get(NOTICE_KEY) or ""
        if text not in old.split(" | "):
            params[NOTICE_KEY] = f"{old} | {text}" if old else text


def interrupted() -> bool:
    """Whether the user interrupted or skipped the job that is ending."""
    try:
        from modules import shared
    except ImportError:
        return False
    state = getattr(shared, "state", None)
    return bool(
        getattr(state, "interrupted", False)
        or getattr(state, "skipped", False)
        or getattr(state, "stopping_generation", False)
    )


def refuse_sampling(unet: Any, error: Exception) -> None:
    """Make a pass fail at its first model evaluation (for errors found once sampling has begun, e.g. in hires)."""

    def modifier(*_args):
        raise error

    unet.add_conditioning_modifier(modifier)


def existing_attn1_replace(unet: Any, key: tuple) -> Callable | None:
    """Another extension's attn1 replace for `key`, to chain to instead of overwriting it. Our own patches (marked
    with `_imgcond`) are looked through, so a patcher cloned from one we already patched does not chain to itself."""
    replaces = unet.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    return resolve_replace(replaces, key)


def resolve_replace(replaces: dict, key: tuple) -> Callable | None:
    """The replace for `key` (with Forge's fallback to `key[:2]`), skipping through our own patches to the one
    they wrapped."""
    fn = replaces.get(key) or replaces.get(key[:2])
    while fn is not None and getattr(fn, "_imgcond", False):
        inner = getattr(fn, "_imgcond_inner", None)
        fn = (inner.get(key) or inner.get(key[:2])) if isinstance(inner, dict) else inner
    return fn


def mark_ours(fn: Callable, inner: Callable | dict | None = None) -> Callable:
    """Mark a patch as this extension's; `inner` is what it wraps (a function, or a dict of replaces by key)."""
    fn._imgcond = True
    fn._imgcond_inner = inner
    return fn


def attention_kernel() -> Callable:
    """Forge's own attention kernel (sdpa / xformers / split / sub-quadratic), as `fn(q, k, v, heads)`."""
    from backend.attention import attention_function

    def attn(q, k, v, heads):
        return attention_function(q, k, v, heads)

    return attn


def load_device(p: Any) -> Any:
    """The device the loaded model samples on (its UNet patcher's `load_device`), None when unknown."""
    unet = getattr(getattr(getattr(p, "sd_model", None), "forge_objects", None), "unet", None)
    return getattr(unet, "load_device", None)


def models_dir(*parts: str) -> str:
    """A folder under the WebUI's models folder (created if missing)."""
    import os

    from modules.paths_internal import models_path

    path = os.path.join(models_path, *parts)
    os.makedirs(path, exist_ok=True)
    return path
