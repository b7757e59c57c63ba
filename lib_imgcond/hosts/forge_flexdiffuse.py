"""CLIP image guidance (FlexDiffuse) on Forge: encoder files, per-job encodings and the conditioning modifier.

`plan` runs in `process()`: it checks the model family, resolves and checks the CLIP vision encoder files, encodes
the guidance images (and the concept prompt, or the header for direct guidance) once per job, so every user error
surfaces before sampling. `install` adds a conditioning modifier to the pass's UnetPatcher clone; it replaces the
positive cross-attention conditioning by a new tensor computed once per distinct input tensor and kept for the job.
The maths is in `lib_imgcond.core.flexdiffuse`; the encoder in `lib_imgcond.core.vision`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from lib_imgcond.core import flex_image, vision, window
from lib_imgcond.core import flexdiffuse as fd
from lib_imgcond.core.errors import ArgumentError, ImgcondError
from lib_imgcond.hosts import forge
from lib_imgcond.log import logger
from lib_imgcond.ui.flex_spec import AUTO, PRIORITY_LABELS
from lib_imgcond.ui.spec import ImageInput

TECHNIQUE = "CLIP image guidance"
FOLDER = ("imgcond", "clip_vision")
EXTENSIONS = (".safetensors",)
DIRECT_PLACEHOLDER = "{}"
"""Direct guidance takes the header (start token) of this placeholder prompt, as FlexDiffuse does."""

# One role per text-encoder half: (label, projection width, argument, file to get).
HALVES = {
    "L": ("CLIP ViT-L/14", fd.SDXL_L_DIM, "encoder", "clip_vision_l.safetensors (openai/clip-vit-large-patch14)"),
    "G": (
        "CLIP ViT-bigG/14",
        fd.SDXL_G_DIM,
        "encoder_g",
        "CLIP-ViT-bigG.safetensors (laion/CLIP-ViT-bigG-14, h94/IP-Adapter sdxl_models/image_encoder)",
    ),
}
STANDARD_NAMES = {"L": "clip-vit-l-14", "G": "clip-vit-bigg-14"}
MAX_MODELS = 2  # SDXL needs its two encoders in one job
MAX_GUIDED = 32  # distinct conditioning tensors remembered per job

_LOCK = threading.Lock()
_MODELS: dict[str, tuple[tuple, vision.VisionTransformer]] = {}  # path → ((mtime, size, dtype), model)


# --- encoder files --------------------------------------------------------------------------------------------------
def default_dir() -> str:
    return forge.models_dir(*FOLDER)


def encoder_dirs(extra_dir: str = "") -> list[str]:
    """The folders searched for encoder files: models/imgcond/clip_vision, then the folder from the settings."""
    dirs = [default_dir()]
    extra = (extra_dir or "").strip()
    if extra:
        extra = os.path.abspath(os.path.expanduser(extra))
        if extra not in dirs:
            dirs.append(extra)
    return dirs


def _describe_dirs(dirs: list[str]) -> str:
    return " or ".join(dirs)


def list_encoders(extra_dir: str = "") -> list[str]:
    """Encoder file names in the folders (the first folder wins for a name found twice)."""
    names: list[str] = []
    for folder in encoder_dirs(extra_dir):
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.lower().endswith(EXTENSIONS) and name not in names and os.path.isfile(os.path.join(folder, name)):
                names.append(name)
    return names


def _is_auto(name: str) -> bool:
    return (name or "").strip().lower() in ("", AUTO.lower(), "auto", "none")


def find_file(name: str, dirs: list[str], arg: str) -> str:
    """The path of encoder file `name` (a bare file name, searched in `dirs`)."""
    name = name.strip()
    if os.path.basename(name) != name or name.startswith("."):
        raise ArgumentError(f"flexdiffuse.{arg}", name, f"a file name from {_describe_dirs(dirs)} (no folders)")
    candidates = [name] if name.lower().endswith(EXTENSIONS) else [name, name + ".safetensors"]
    for folder in dirs:
        for candidate in candidates:
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    raise ImgcondError(
        f"{TECHNIQUE}: the encoder file '{name}' ({arg}) is not in {_describe_dirs(dirs)}. Put it there, or choose "
        f"'{AUTO}' to use the first suitable file found."
    )


def inspect(path: str) -> vision.VisionConfig:
    """Architecture of an encoder file, read from its header only."""
    name = os.path.basename(path)
    try:
        shapes = vision.read_shapes(path)
    except Exception as e:  # not a safetensors file, truncated, unreadable
        raise ImgcondError(f"{TECHNIQUE}: cannot read {name} as a .safetensors file ({e})") from None
    return vision.detect_config(shapes, name)


def check_role(cfg: vision.VisionConfig, role: str, family: str) -> None:
    """Raise a clear error unless `cfg` is a CLIP vision encoder whose projection fits half `role` of the model."""
    label, dim, arg, wanted = HALVES[role]
    model = forge.FAMILY_LABELS.get(family, family)
    where = "the text embedding" if family == "sd15" else f"the {'CLIP-L' if role == 'L' else 'CLIP-G'} half"
    if cfg.kind != "clip":
        raise ImgcondError(
            f"{TECHNIQUE} ({arg}): {cfg.source} is a {cfg.name} encoder, not a CLIP vision encoder with projection; "
            f"use a {label} file such as {wanted}"
        )
    if cfg.proj_dim != dim:
        raise ImgcondError(
            f"{TECHNIQUE} ({arg}): {cfg.source} is {cfg.name} with a {cfg.proj_dim}-d projection, but {where} of "
            f"{model} is {dim}-d: use a {label} encoder such as {wanted}"
        )


def auto_pick(role: str, family: str, dirs: list[str], names: list[str]) -> tuple[str, vision.VisionConfig]:
    """The first file whose projection fits `role`, preferring the standard architecture."""
    label, dim, arg, wanted = HALVES[role]
    found: list[tuple[int, str, str, vision.VisionConfig]] = []
    unfit: list[str] = []
    for name in names:
        path = find_file(name, dirs, arg)
        try:
            cfg = inspect(path)
        except ImgcondError:
            unfit.append(f"{name}: not a vision encoder")
            continue
        if cfg.kind == "clip" and cfg.proj_dim == dim:
            found.append((0 if cfg.name == STANDARD_NAMES[role] else 1, name, path, cfg))
        else:
            unfit.append(f"{name}: {cfg.name}" + (f", {cfg.proj_dim}-d" if cfg.proj_dim else ""))
    if not found:
        model = forge.FAMILY_LABELS.get(family, family)
        others = f" (found only {'; '.join(unfit[:4])})" if unfit else ""
        raise ImgcondError(
            f"{TECHNIQUE} needs a {label} vision encoder ({dim}-d projection) for {model}, but none is in "
            f"{_describe_dirs(dirs)}{others}. Put {wanted} (Hugging Face CLIPVisionModelWithProjection format) there."
        )
    found.sort(key=lambda f: (f[0], f[1]))
    return found[0][2], found[0][3]


def resolve(value: str, role: str, family: str, extra_dir: str = "") -> tuple[str, vision.VisionConfig]:
    """Path and architecture of the encoder for `role` ('L' or 'G'), checked against the model."""
    dirs = encoder_dirs(extra_dir)
    arg = HALVES[role][2]
    if _is_auto(value):
        return auto_pick(role, family, dirs, list_encoders(extra_dir))
    path = find_file(value, dirs, arg)
    cfg = inspect(path)
    check_role(cfg, role, family)
    return path, cfg


# --- loading and encoding ---------------------------------------------------------------------------------------------
def _placement() -> tuple[torch.device, torch.device, torch.dtype]:
    """(compute device, storage device, dtype): fp16 on Forge's text-encoder GPU when it allows, else fp32 on CPU."""
    cpu = torch.device("cpu")
    try:
        from backend import memory_management as mm
    except ImportError:
        return cpu, cpu, torch.float32
    device = torch.device(mm.text_encoder_device())
    if device.type != "cuda":
        return cpu, cpu, torch.float32
    dtype = torch.float16 if mm.should_use_fp16(device) else torch.float32
    return device, torch.device(mm.text_encoder_offload_device()), dtype


def _make_room(device: torch.device, model: torch.nn.Module) -> None:
    if device.type == "cpu":
        return
    try:
        from backend import memory_management as mm

        need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        mm.free_memory(need * 1.3, device)
    except Exception as e:  # freeing memory is a courtesy; encoding still works without it
        logger.debug("could not free memory before encoding: %s", e)


def load_encoder(path: str) -> vision.VisionTransformer:
    """The encoder in `path`, loaded once and kept (at most two, for SDXL's pair) on the storage device."""
    import safetensors.torch

    _device, storage, dtype = _placement()
    stat = os.stat(path)
    key = (stat.st_mtime_ns, stat.st_size, dtype, storage.type)
    with _LOCK:
        hit = _MODELS.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        _MODELS.pop(path, None)
        while len(_MODELS) >= MAX_MODELS:
            _MODELS.pop(next(iter(_MODELS)))
        name = os.path.basename(path)
        try:
            state = safetensors.torch.load_file(path, device="cpu")
        except Exception as e:
            raise ImgcondError(f"{TECHNIQUE}: cannot load {name} ({e})") from None
        model = vision.load_vision_model(state, dtype=dtype, device=storage, source=name)
        del state
        _MODELS[path] = (key, model)
        logger.info("%s: loaded %s (%s, %s)", TECHNIQUE, name, model.config.name, str(dtype).replace("torch.", ""))
        return model


def unload_encoders() -> None:
    with _LOCK:
        _MODELS.clear()


def image_tensor(image: ImageInput) -> torch.Tensor:
    """A PIL image as a (1, 3, H, W) float tensor in [0, 1]."""
    import numpy as np

    arr = np.asarray(image.image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)


def compat_pixels(image: ImageInput, size: int) -> torch.Tensor:
    """FlexDiffuse's own preprocessing of a guidance image → normalised (1, 3, size, size) float32 pixels: PIL
    LANCZOS to the original's size (long side 512, short side floored to a multiple of 64), then
    :func:`lib_imgcond.core.flex_image.compat_pixels` (the [-1, 1] crop, unclamped bicubic resize, normalisation)."""
    from PIL import Image

    pil = image.image
    resized = pil.resize(flex_image.compat_resize_size(*pil.size), resample=Image.LANCZOS).convert("RGB")
    return flex_image.compat_pixels(image_tensor(ImageInput(resized)), size)


@torch.no_grad()
def encode_images(model: vision.VisionTransformer, images: list[ImageInput], compatible: bool) -> list[torch.Tensor]:
    """Projected CLIP tokens (1 + patches, proj) of every image, float32 on the CPU.

    Corrected mode: the encoder's standard preprocessing (short side to the input size, centre crop, 8-bit,
    CLIP normalisation of [0, 1] pixels). Compatible mode: FlexDiffuse's own pipeline (:func:`compat_pixels`).
    """
    device, storage, _dtype = _placement()
    if device != storage:
        _make_room(device, model)
        model.to(device)
    try:
        out = []
        cfg = model.config
        for i, image in enumerate(images):
            if compatible:
                result = model(compat_pixels(image, cfg.image_size).to(device))
            else:
                result = model.encode(image_tensor(image))
            tokens = result.projected_tokens[0].float().cpu()
            if not bool(torch.isfinite(tokens).all()):
                raise ImgcondError(
                    f"{TECHNIQUE}: guidance image {i + 1} encoded to NaN/inf values with {cfg.source}; "
                    "the file may be damaged, or try --all-in-fp32"
                )
            out.append(tokens)
        return out
    finally:
        if device != storage:
            model.to(storage)


# --- the job ----------------------------------------------------------------------------------------------------------
def flex_params(values: dict) -> fd.FlexParams:
    return fd.FlexParams(
        threshold_mult=values["threshold_mult"],
        threshold_floor=values["threshold_floor"],
        linear_start=values["linear_start"],
        linear_end=values["linear_end"],
        clustered=values["clustered"],
        max_guidance=values["max_guidance"],
        header_max=values["header_max"],
        priority=PRIORITY_LABELS[values["priority"]],
        reuse=values["reuse"],
        concept_threshold=values["concept_threshold"],
        compatible=values["compatible"],
    ).validate()


@dataclass
class Half:
    """One text-encoder half (SD1.5 has one, SDXL two): its encoder and the guidance images' tokens."""

    role: str
    dim: int
    path: str
    name: str
    tokens: list[tuple[torch.Tensor, float]]
    concept: torch.Tensor | None = None  # (1, 77k, dim)
    header: torch.Tensor | None = None  # (dim,)


@dataclass
class Job:
    values: dict
    family: str
    params: fd.FlexParams
    halves: list[Half]
    extra_images: int = 0  # images given through the API's `images` list
    guided: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (input, output) pairs
    computed: int = 0

    @property
    def encoder_names(self) -> dict[str, str]:
        return {HALVES[h.role][2]: h.name for h in self.halves}


def _crossattn(cond: Any, what: str) -> torch.Tensor:
    tensor = cond.get("crossattn") if isinstance(cond, dict) else cond
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
        raise ImgcondError(f"{TECHNIQUE}: the text encoder returned no (batch, tokens, dim) embedding for {what}")
    return tensor


def _text_halves(p: Any, text: str, family: str, what: str) -> list[torch.Tensor]:
    """The model's own text embedding of `text`, split into the halves (float32, CPU, out of inference mode)."""
    emb = _crossattn(p.sd_model.get_learned_conditioning([text]), what)
    expected = fd.SDXL_L_DIM + fd.SDXL_G_DIM if family == "sdxl" else fd.SDXL_L_DIM
    if emb.shape[-1] != expected:
        raise ImgcondError(
            f"{TECHNIQUE}: the {what} embedding is {emb.shape[-1]}-d, expected {expected}-d for "
            f"{forge.FAMILY_LABELS[family]}"
        )
    emb = emb[:1].detach().float().cpu().clone()
    return list(fd.split_sdxl(emb)) if family == "sdxl" else [emb]


def plan(p: Any, values: dict, extra_images: list[tuple[ImageInput, float]], extra_dir: str = "") -> Job:
    """Validate and prepare everything a job needs, before any sampling; raise ImgcondError otherwise."""
    family = forge.require_family(p.sd_model, ("sd15", "sdxl"), TECHNIQUE)
    images = [(values["image"], values["weight"]), (values["image2"], values["weight2"]), *extra_images]
    images = [(img, float(w)) for img, w in images if img is not None]
    if not images:
        raise ImgcondError(f"{TECHNIQUE} is on but no guidance image was given: add an image, or turn {TECHNIQUE} off")
    params = flex_params(values)
    window.check(values["start"], values["end"], "flexdiffuse")
    weights = [w for _, w in images]
    if values["direct"] and (min(weights) < 0 or sum(weights) <= 0):
        raise ArgumentError("flexdiffuse.weight", weights, "non-negative weights, not all 0, for direct guidance")
    roles = ["L", "G"] if family == "sdxl" else ["L"]
    halves = []
    for role in roles:
        path, cfg = resolve(values[HALVES[role][2]], role, family, extra_dir)
        model = load_encoder(path)
        tokens = encode_images(model, [img for img, _ in images], params.compatible)
        if values["direct"] and tokens[0].shape[0] < fd.CHUNK:
            raise ImgcondError(
                f"{TECHNIQUE}: direct image guidance needs at least {fd.CHUNK} image tokens, "
                f"{cfg.source} gives {tokens[0].shape[0]}"
            )
        weighted = list(zip(tokens, [w for _, w in images], strict=True))
        halves.append(Half(role, HALVES[role][1], path, os.path.basename(path), weighted))
    concept = values["concept"].strip()
    if values["direct"]:
        for half, emb in zip(halves, _text_halves(p, DIRECT_PLACEHOLDER, family, "placeholder prompt"), strict=True):
            half.header = emb[0, 0]
    elif concept:
        for half, emb in zip(halves, _text_halves(p, concept, family, "concept prompt"), strict=True):
            half.concept = emb
    return Job(values, family, params, halves, extra_images=len(extra_images))


def infotext(job: Job, spec) -> dict[str, Any]:
    """The job's infotext entries: the parameters, with the encoder files actually used."""
    values = dict(job.values)
    values.update(job.encoder_names)
    skip = [] if values["image2"] is not None else ["weight2"]
    if job.family != "sdxl":
        skip.append("encoder_g")
    out = spec.infotext(values, skip=skip)
    if job.extra_images:
        out[spec.key("images")] = job.extra_images
    return out


# --- guidance ---------------------------------------------------------------------------------------------------------
def _direct(half: Half, length: int, batch: int, like: torch.Tensor) -> torch.Tensor:
    total = sum(w for _, w in half.tokens)
    acc = None
    for tokens, weight in half.tokens:
        if weight == 0:
            continue
        d = fd.direct_guidance(tokens, half.header) * (weight / total)
        acc = d if acc is None else acc + d
    reps = length // fd.CHUNK
    out = acc.repeat(reps, 1).unsqueeze(0).expand(batch, -1, -1)
    return out.to(device=like.device, dtype=like.dtype).contiguous()


def _guide_half(job: Job, half: Half, x: torch.Tensor) -> torch.Tensor:
    if job.values["direct"]:
        return _direct(half, x.shape[1], x.shape[0], x)
    return fd.guide_chunks(x, half.tokens, job.params, half.concept)


def guide(job: Job, cond: torch.Tensor) -> torch.Tensor:
    """The guided version of a positive cross-attention tensor (B, 77k, D): computed once per distinct input."""
    for inp, out in job.guided:
        if inp.shape == cond.shape and inp.dtype == cond.dtype and inp.device == cond.device and torch.equal(inp, cond):
            return out.clone()
    if cond.dim() != 3 or cond.shape[1] % fd.CHUNK:
        raise ImgcondError(
            f"{TECHNIQUE}: unexpected conditioning of shape {tuple(cond.shape)}, expected (batch, 77·k, dim)"
        )
    if job.family == "sdxl":
        l_part, g_part = fd.split_sdxl(cond)
        out = fd.join_sdxl(_guide_half(job, job.halves[0], l_part), _guide_half(job, job.halves[1], g_part))
    else:
        out = _guide_half(job, job.halves[0], cond)
    out = out.to(dtype=cond.dtype, device=cond.device)
    job.computed += 1
    if len(job.guided) >= MAX_GUIDED:
        job.guided.pop(0)
    job.guided.append((cond.detach().clone(), out))
    return out.clone()


def _condition(tensor: torch.Tensor):
    from backend.sampling.condition import ConditionCrossAttn

    return ConditionCrossAttn(tensor)


def guided_entry(job: Job, entry: dict) -> dict:
    """A new conditioning dict whose c_crossattn is a new ConditionCrossAttn; the input dict is not modified."""
    model_conds = entry.get("model_conds") or {}
    current = model_conds.get("c_crossattn")
    tensor = getattr(current, "cond", None)
    if not isinstance(tensor, torch.Tensor):
        return entry
    new = guide(job, tensor)
    out = dict(entry)
    out["model_conds"] = {**model_conds, "c_crossattn": _condition(new)}
    if "cross_attn" in out:
        out["cross_attn"] = new
    return out


def install(unet: Any, job: Job) -> None:
    """Add the conditioning modifier (positive conditioning only, inside the start/end window, tested per model
    evaluation from its sigma) to `unet`."""
    predictor = getattr(unet.model, "predictor", None)
    inside = window.sigma_test(
        job.values["start"], job.values["end"], None if predictor is None else predictor.percent_to_sigma
    )

    def modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        if cond and inside(float(torch.as_tensor(timestep).flatten()[0])):
            cond = [guided_entry(job, entry) for entry in cond]
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    forge.mark_ours(modifier)
    unet.add_conditioning_modifier(modifier)
