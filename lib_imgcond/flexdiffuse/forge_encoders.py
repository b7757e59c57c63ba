"""CLIP image guidance's vision encoders: which file serves which text-encoder half, loading it into the host's
model management, and encoding the guidance images (once per job and image; `lib_imgcond.vision.forge_encoders`).

Files come from models/imgcond/clip_vision, the folder in the settings, then models/clip_vision and
models/ControlNetPreprocessor (CLIP vision encoders only). This is also the CLIP vision loader for other techniques:
`resolve` + `load_encoder` + `encode_images`.
"""

from __future__ import annotations

import os

import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.common.log import logger
from lib_imgcond.flexdiffuse import image as flex_image
from lib_imgcond.flexdiffuse import params
from lib_imgcond.flexdiffuse.spec import AUTO
from lib_imgcond.host import forge
from lib_imgcond.spec.params import ImageInput
from lib_imgcond.vision import config as vision_cfg
from lib_imgcond.vision import forge_encoders as encoders
from lib_imgcond.vision import transformer as vision

TECHNIQUE = "CLIP image guidance"  # the default `technique` of the helpers; Style model and unCLIP pass their own
PREFIX = "flexdiffuse"  # the default argument prefix (Style model: style_model, unCLIP: unclip)
FOLDER = ("imgcond", "clip_vision")
EXTENSIONS = encoders.EXTENSIONS

# One role per text-encoder half: (label, projection width, argument, file to get).
HALVES = {
    "L": ("CLIP ViT-L/14", params.SDXL_L_DIM, "encoder", "clip_vision_l.safetensors (openai/clip-vit-large-patch14)"),
    "G": (
        "CLIP ViT-bigG/14",
        params.SDXL_G_DIM,
        "encoder_g",
        "CLIP-ViT-bigG.safetensors (laion/CLIP-ViT-bigG-14, h94/IP-Adapter sdxl_models/image_encoder)",
    ),
}
STANDARD_NAMES = {"L": "clip-vit-l-14", "G": "clip-vit-bigg-14"}
MAX_MODELS = 2  # SDXL needs its two encoders in one job
_MODELS = encoders.ModelCache(MAX_MODELS)


# --- encoder files --------------------------------------------------------------------------------------------------
def default_dir() -> str:
    return forge.models_dir(*FOLDER)


def encoder_dirs(extra_dir: str = "") -> list[str]:
    """The extension's own folders for encoder files: models/imgcond/clip_vision, then the folder from the settings
    (the shared models/clip_vision and models/ControlNetPreprocessor are searched after them)."""
    dirs = [default_dir()]
    extra = (extra_dir or "").strip()
    if extra:
        extra = os.path.abspath(os.path.expanduser(extra))
        if extra not in dirs:
            dirs.append(extra)
    return dirs


def searched_dirs(extra_dir: str = "") -> list[str]:
    """Every folder searched, in order."""
    return [*encoder_dirs(extra_dir), *(d for d, _ in encoders.shared_dirs())]


def _describe_dirs(extra_dir: str) -> str:
    return encoders.describe_dirs(encoder_dirs(extra_dir), "clip")


def entries(extra_dir: str = "") -> list[encoders.Entry]:
    return encoders.catalogue(encoder_dirs(extra_dir), "clip")


EXTRA_DIR_OPTION = "imgcond_flexdiffuse_extra_dir"  # CLIP image guidance's setting; Style model and unCLIP share it


def extra_encoder_dir() -> str:
    """The extra CLIP vision encoder folder of the settings ('' outside a WebUI)."""
    try:
        from modules import shared

        return str(getattr(shared.opts, EXTRA_DIR_OPTION, "") or "")
    except Exception:  # no WebUI (tests)
        return ""


def configured_encoders() -> list[str]:
    """The encoder files in the standard folders and the settings' extra folder."""
    return list_encoders(extra_encoder_dir())


def list_encoders(extra_dir: str = "") -> list[str]:
    """The dropdown choices: encoder files of every searched folder (a name in two folders shows its folder)."""
    return [e.label for e in entries(extra_dir)]


def choice_label(path: str, extra_dir: str = "") -> str:
    """How the infotext names the encoder file at `path` (its dropdown choice)."""
    real = os.path.realpath(path)
    for entry in entries(extra_dir):
        if os.path.realpath(entry.path) == real:
            return entry.label
    return os.path.basename(path)


def _is_auto(name: str) -> bool:
    return (name or "").strip().lower() in ("", AUTO.lower(), "auto", "none")


def find_file(name: str, extra_dir: str, arg: str, technique: str = TECHNIQUE, prefix: str = PREFIX) -> str:
    """The path of the encoder choice `name` (a dropdown choice or a bare file name); errors name `technique` (the
    accordion title of the caller) and its argument `prefix.arg`."""
    name = name.strip()
    entry = encoders.find(entries(extra_dir), name)
    if entry is not None:
        return entry.path
    where = _describe_dirs(extra_dir)
    if os.path.basename(name) != name or name.startswith("."):
        raise ArgumentError(f"{prefix}.{arg}", name, f"a file name from {where} (no folders)")
    raise ImgcondError(
        f"{technique}: the encoder file '{name}' ({arg}) is not in {where}. Put it there, or choose "
        f"'{AUTO}' to use the first suitable file found."
    )


def inspect(path: str, technique: str = TECHNIQUE) -> vision_cfg.VisionConfig:
    """Architecture of an encoder file, read from its header only; errors name `technique`."""
    name = os.path.basename(path)
    try:
        shapes = vision_cfg.read_shapes(path)
    except Exception as e:  # not a safetensors file, truncated, unreadable
        raise ImgcondError(f"{technique}: cannot read {name} as a .safetensors file ({e})") from None
    try:
        return vision_cfg.detect_config(shapes, name)
    except ImgcondError as e:  # not a vision encoder, OpenCLIP layout, malformed
        raise ImgcondError(f"{technique}: {e}") from None


def check_role(cfg: vision_cfg.VisionConfig, role: str, family: str, technique: str = TECHNIQUE) -> None:
    """Raise a clear error unless `cfg` is a CLIP vision encoder whose projection fits half `role` of the model."""
    label, dim, arg, wanted = HALVES[role]
    model = forge.FAMILY_LABELS.get(family, family)
    where = "the text embedding" if family == "sd15" else f"the {'CLIP-L' if role == 'L' else 'CLIP-G'} half"
    if cfg.kind != "clip":
        raise ImgcondError(
            f"{technique} ({arg}): {cfg.source} is a {cfg.name} encoder, not a CLIP vision encoder with projection; "
            f"use a {label} file such as {wanted}"
        )
    if cfg.proj_dim != dim:
        raise ImgcondError(
            f"{technique} ({arg}): {cfg.source} is {cfg.name} with a {cfg.proj_dim}-d projection, but {where} of "
            f"{model} is {dim}-d: use a {label} encoder such as {wanted}"
        )


def auto_pick(
    role: str, family: str, extra_dir: str = "", technique: str = TECHNIQUE
) -> tuple[str, vision_cfg.VisionConfig]:
    """The first file whose projection fits `role`, preferring the standard architecture."""
    label, dim, _arg, wanted = HALVES[role]
    found: list[tuple[int, int, str, vision_cfg.VisionConfig]] = []
    unfit: list[str] = []
    for order, entry in enumerate(entries(extra_dir)):
        try:
            cfg = inspect(entry.path, technique)
        except ImgcondError:
            unfit.append(f"{entry.label}: not a vision encoder")
            continue
        if cfg.kind == "clip" and cfg.proj_dim == dim:
            found.append((0 if cfg.name == STANDARD_NAMES[role] else 1, order, entry.path, cfg))
        else:
            unfit.append(f"{entry.label}: {cfg.name}" + (f", {cfg.proj_dim}-d" if cfg.proj_dim else ""))
    if not found:
        model = forge.FAMILY_LABELS.get(family, family)
        others = f" (found only {'; '.join(unfit[:4])})" if unfit else ""
        raise ImgcondError(
            f"{technique} needs a {label} vision encoder ({dim}-d projection) for {model}, but none is in "
            f"{_describe_dirs(extra_dir)}{others}. Put {wanted} (Hugging Face CLIPVisionModelWithProjection format) "
            "there."
        )
    found.sort(key=lambda f: (f[0], f[1]))
    return found[0][2], found[0][3]


def resolve(
    value: str, role: str, family: str, extra_dir: str = "", technique: str = TECHNIQUE, prefix: str = PREFIX
) -> tuple[str, vision_cfg.VisionConfig]:
    """Path and architecture of the encoder for `role` ('L' or 'G'), checked against the model. Errors name
    `technique` (the caller's accordion title) and its argument under `prefix`."""
    if _is_auto(value):
        return auto_pick(role, family, extra_dir, technique)
    path = find_file(value, extra_dir, HALVES[role][2], technique, prefix)
    cfg = inspect(path, technique)
    check_role(cfg, role, family, technique)
    return path, cfg


# --- loading and encoding ---------------------------------------------------------------------------------------------
def load_encoder(path: str, technique: str = TECHNIQUE) -> encoders.Managed:
    """The encoder in `path`, loaded once and kept (at most two, for SDXL's pair) inside the host's model
    management. The result has `config`, `encode(images)` and `use()` (see `encoders.Managed`). Errors and the log
    line name `technique`."""
    import safetensors.torch

    load, offload, dtype = encoders.placement()
    key = (*encoders.file_key(path), str(dtype), offload.type)

    def build() -> encoders.Managed:
        name = os.path.basename(path)
        try:
            state = safetensors.torch.load_file(path, device="cpu")
        except Exception as e:
            raise ImgcondError(f"{technique}: cannot load {name} ({e})") from None
        try:
            module = vision.load_vision_model(state, dtype=dtype, device=offload, source=name)
        except ImgcondError as e:  # not a vision encoder, wrong tensor names or shapes
            raise ImgcondError(f"{technique}: {e}") from None
        del state
        logger.info("%s: loaded %s (%s, %s)", technique, name, module.config.name, str(dtype).replace("torch.", ""))
        return encoders.Managed(module, load, offload, key)

    return _MODELS.get(os.path.abspath(path), key, build)


def unload_encoders() -> None:
    _MODELS.clear()


def image_tensor(image: ImageInput) -> torch.Tensor:
    """A PIL image as a (1, 3, H, W) float tensor in [0, 1]."""
    import numpy as np

    arr = np.asarray(image.image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)


def compat_pixels(image: ImageInput, size: int) -> torch.Tensor:
    """FlexDiffuse's own preprocessing of a guidance image → normalised (1, 3, size, size) float32 pixels: PIL
    LANCZOS to the original's size (long side 512, short side floored to a multiple of 64), then
    :func:`lib_imgcond.flexdiffuse.image.compat_pixels` (the [-1, 1] crop, unclamped bicubic resize, normalisation)."""
    from PIL import Image

    pil = image.image
    resized = pil.resize(flex_image.compat_resize_size(*pil.size), resample=Image.LANCZOS).convert("RGB")
    return flex_image.compat_pixels(image_tensor(ImageInput(resized)), size)


@torch.no_grad()
def encode_images(
    model: encoders.Managed,
    images: list[ImageInput],
    compatible: bool,
    cache: encoders.Encodings | None = None,
) -> list[torch.Tensor]:
    """Projected CLIP tokens (1 + patches, proj) of every image, float32 on the CPU; with the job's `cache` an image
    already encoded this job (same pixels, encoder and mode) is not encoded again.

    Corrected mode: the encoder's standard preprocessing (short side to the input size, centre crop, 8-bit,
    CLIP normalisation of [0, 1] pixels). Compatible mode: FlexDiffuse's own pipeline (:func:`compat_pixels`).
    """
    cfg = model.config

    def run(i: int, image: ImageInput) -> torch.Tensor:
        result = model(compat_pixels(image, cfg.image_size)) if compatible else model.encode(image_tensor(image))
        tokens = result.projected_tokens[0].float().cpu()
        if not bool(torch.isfinite(tokens).all()):
            raise ImgcondError(
                f"{TECHNIQUE}: guidance image {i + 1} encoded to NaN/inf values with {cfg.source}; "
                "the file may be damaged, or try --all-in-fp32"
            )
        return tokens

    out = []
    for i, image in enumerate(images):
        if cache is None:
            out.append(run(i, image))
            continue
        key = ("clip-projected-tokens", model.key, "compatible" if compatible else "standard", cfg.image_size)
        out.append(cache.get((*key, encoders.content_hash(image.image)), lambda i=i, image=image: run(i, image)))
    return out
