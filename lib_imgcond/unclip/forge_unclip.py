"""unCLIP on Forge 2.0: an SD2.1-unclip checkpoint's ADM input `y`, fed per model evaluation.

Forge 2.0 loads SD2.1-unclip-h / -l checkpoints (huggingface_guess's SD21UnclipH / SD21UnclipL are SD2.0 variants:
the StableDiffusion2 engine, a UNet whose `label_emb` takes a 2048- / 1536-d `y`), but nothing gives that UNet its
`y`, so sampling stops at the UNet's `y`-presence assertion. `plan` (in `process()`) checks the model, reads the
noise augmentor's tensors from the checkpoint file (Forge's loader drops them), finds the CLIP vision encoder whose
projection fits (reusing CLIP image guidance's encoder files and loading), encodes every image once and builds the
positive `y` (conditioning.py). `install` adds a conditioning modifier that puts `y` on every cond entry inside the step
window, and a zero `y` on the uncond entries (and on cond outside the window): the reference implementations'
negative side, and what makes the UNet run at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from lib_imgcond.common import window
from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.common.log import logger
from lib_imgcond.flexdiffuse import forge_encoders
from lib_imgcond.host import forge
from lib_imgcond.spec.families import UNCLIP
from lib_imgcond.unclip import conditioning as unclip
from lib_imgcond.unclip.spec import AUTO, SLOT_FIELDS, SLOTS, used_slots
from lib_imgcond.vision import config as vision_cfg
from lib_imgcond.vision import forge_encoders as encoders

TECHNIQUE = "unCLIP"  # the accordion title: every error, also of the shared encoder helpers, names it
PREFIX = "unclip"  # the spec's argument prefix
FAMILIES = ("sd2",)  # SD2.1 unCLIP checkpoints (an SD2.x UNet with an ADM input)
TOWERS = {  # ADM width → (tower, projection, standard architecture, file to get)
    2048: ("ViT-H/14", 1024, "clip-vit-h-14", "CLIP-ViT-H-14.safetensors"),
    1536: ("ViT-L/14", 768, "clip-vit-l-14", "clip_vision_l.safetensors"),
}


def adm_width(sd_model: Any) -> int | None:
    """The width of the UNet's ADM input when it is an unCLIP UNet (2048 for -h, 1536 for -l), else None."""
    try:
        unet = sd_model.forge_objects.unet.model.diffusion_model
        if getattr(unet, "num_classes", None) != "sequential":
            return None
        width = int(unet.label_emb[0][0].in_features)
    except (AttributeError, IndexError, TypeError):
        return None
    return width if width in TOWERS else None


def require_unclip(sd_model: Any) -> int:
    family = forge.model_family(sd_model)
    width = adm_width(sd_model) if family in FAMILIES else None
    if width is None:
        label = forge.FAMILY_LABELS[family]
        why = UNCLIP.reason(family) if family not in FAMILIES else "its UNet has no unCLIP image input (`label_emb`)"
        raise ImgcondError(
            f"{TECHNIQUE} needs an SD2.1 unCLIP checkpoint (sd21-unclip-h or sd21-unclip-l), but the loaded "
            f"checkpoint is {label}: {why}. Load an unCLIP checkpoint or turn {TECHNIQUE} off."
        )
    return width


def checkpoint_path(sd_model: Any) -> str:
    path = getattr(sd_model, "filename", None) or getattr(
        getattr(sd_model, "sd_checkpoint_info", None), "filename", None
    )
    if not path or not os.path.isfile(path):
        raise ImgcondError(f"{TECHNIQUE}: cannot find the loaded checkpoint's file to read its noise augmentor")
    return path


def read_augmentor(path: str) -> unclip.NoiseAugmentor:
    """The noise augmentor of a checkpoint file (only its `noise_augmentor.*` tensors are read)."""
    name = os.path.basename(path)
    if not path.lower().endswith(".safetensors"):
        raise ImgcondError(f"{TECHNIQUE}: {name} is not a .safetensors checkpoint; its noise augmentor cannot be read")
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(unclip.PREFIX)}  # noqa: SIM118
    return unclip.noise_augmentor(state, name)


def resolve_encoder(value: str, width: int, extra_dir: str = "") -> tuple[str, vision_cfg.VisionConfig]:
    label, dim, standard, example = TOWERS[width]
    where = " or ".join(forge_encoders.searched_dirs(extra_dir))
    if (value or "").strip().lower() in ("", AUTO.lower(), "auto"):
        found = []
        for name in forge_encoders.list_encoders(extra_dir):
            path = forge_encoders.find_file(name, extra_dir, "encoder", TECHNIQUE, PREFIX)
            try:
                cfg = forge_encoders.inspect(path, TECHNIQUE)
            except ImgcondError:
                continue
            if cfg.kind == "clip" and cfg.proj_dim == dim:
                found.append((cfg.name != standard, name, path, cfg))
        if not found:
            raise ImgcondError(
                f"{TECHNIQUE} needs a CLIP {label} vision encoder ({dim}-d projection) for this checkpoint, but none "
                f"is in {where}. Put {example} (Hugging Face CLIPVisionModelWithProjection format) there."
            )
        return min(found)[2], min(found)[3]
    path = forge_encoders.find_file(value, extra_dir, "encoder", TECHNIQUE, PREFIX)
    cfg = forge_encoders.inspect(path, TECHNIQUE)
    if cfg.kind != "clip" or cfg.proj_dim != dim:
        raise ImgcondError(
            f"{TECHNIQUE}: {os.path.basename(path)} is {cfg.name} ({cfg.proj_dim}-d), but this checkpoint needs a "
            f"CLIP {label} vision encoder with a {dim}-d projection, such as {example}"
        )
    return path, cfg


@torch.no_grad()
def image_embeds(model: encoders.Managed, image) -> torch.Tensor:
    """CLIP `image_embeds` (1, D) float32 CPU of one PIL image (the encoder's standard preprocessing); the encoder
    is loaded through the host's model management."""
    return model.encode(forge_encoders.image_tensor(image)).image_embeds.float().cpu()


@dataclass
class Job:
    values: dict
    y: torch.Tensor  # (1, W) float32 CPU; all zero when every strength is 0
    encoder: str


def plan(p: Any, values: dict, extra_dir: str = "") -> Job:
    width = require_unclip(p.sd_model)
    window.check(float(values["start"]), float(values["end"]), PREFIX)
    slots = used_slots(values)
    if not slots:
        raise ImgcondError(f"{TECHNIQUE} is on but no image was given: add image1 (an unCLIP model needs one)")
    augmentor = read_augmentor(checkpoint_path(p.sd_model))
    if 2 * augmentor.dim != width:
        raise ImgcondError(f"{TECHNIQUE}: the noise augmentor is {augmentor.dim}-d but the UNet takes {width}-d")
    path, _cfg = resolve_encoder(values["encoder"], width, extra_dir)
    model = forge_encoders.load_encoder(path, TECHNIQUE)
    seeds = getattr(p, "all_seeds", None) or [getattr(p, "seed", 0)]
    generator = torch.Generator().manual_seed(int(seeds[0]))
    images = []
    for k in slots:
        strength = float(values[f"strength{k}"])
        if strength == 0:
            continue
        embeds = image_embeds(model, values[f"image{k}"])
        images.append((embeds, strength, float(values[f"noise_augmentation{k}"])))
    y = unclip.adm(augmentor, images, generator, float(values["merge_noise_augmentation"])) if images else None
    job = Job(values, torch.zeros(1, width) if y is None else y, os.path.basename(path))
    logger.info("%s: y from image(s) %s", TECHNIQUE, ", ".join(map(str, slots)))
    return job


def infotext(job: Job, spec) -> dict[str, Any]:
    used = set(used_slots(job.values))
    skip = [f"{name}{k}" for k in range(1, SLOTS + 1) if k not in used for name in SLOT_FIELDS]
    if len([k for k in used if job.values[f"strength{k}"]]) < 2:
        skip.append("merge_noise_augmentation")
    return spec.infotext({**job.values, "encoder": job.encoder}, skip=skip)


def _with_y(entry: dict, y: torch.Tensor, cls) -> dict:
    conds = dict(entry["model_conds"])
    batch = conds["c_crossattn"].cond.shape[0] if "c_crossattn" in conds else 1
    conds["y"] = cls(y.expand(batch, -1))
    return {**entry, "model_conds": conds}


def make_modifier(job: Job, percent_to_sigma):
    inside = window.sigma_test(float(job.values["start"]), float(job.values["end"]), percent_to_sigma)
    placed: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        from backend.sampling.condition import Condition

        key = (x.device, x.dtype)
        if key not in placed:
            y = job.y.to(device=x.device, dtype=x.dtype)
            placed[key] = (y, torch.zeros_like(y))
        y, zero = placed[key]
        positive = y if inside(float(torch.as_tensor(timestep).flatten()[0])) else zero
        cond = [_with_y(e, positive, Condition) for e in cond] if cond else cond
        uncond = [_with_y(e, zero, Condition) for e in uncond] if uncond else uncond
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    return forge.mark_ours(modifier)


def install(unet: Any, job: Job) -> None:
    predictor = getattr(unet.model, "predictor", None)
    unet.add_conditioning_modifier(make_modifier(job, getattr(predictor, "percent_to_sigma", None)))
