"""CLIP image guidance (FlexDiffuse) on Forge: encoder files, per-job encodings and the conditioning modifier.

`plan` runs in `process()`: it checks the model family, resolves and checks the CLIP vision encoder files
(`forge_encoders`), encodes the guidance images (and the concept prompt, or the header for direct guidance) once per
job (the job's encodings cache: an image given twice is encoded once), so every user error
surfaces before sampling. `install` adds a conditioning modifier to the pass's UnetPatcher clone; it replaces the
positive cross-attention conditioning by a new tensor computed once per distinct input tensor and kept for the job.
The maths is in `lib_imgcond.flexdiffuse.guidance`; the encoder in `lib_imgcond.vision.transformer`, inside the
host's model management (`lib_imgcond.vision.forge_encoders`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lib_imgcond.common import window
from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.flexdiffuse import guidance as fd
from lib_imgcond.flexdiffuse import params as fp
from lib_imgcond.flexdiffuse.forge_encoders import HALVES, TECHNIQUE, choice_label, encode_images, load_encoder, resolve
from lib_imgcond.flexdiffuse.spec import PRIORITY_LABELS
from lib_imgcond.host import forge
from lib_imgcond.spec.families import FLEXDIFFUSE
from lib_imgcond.spec.params import ImageInput
from lib_imgcond.vision import forge_encoders as encoders

DIRECT_PLACEHOLDER = "{}"
"""Direct guidance takes the header (start token) of this placeholder prompt, as FlexDiffuse does."""
MAX_GUIDED = 32  # distinct conditioning tensors remembered per job
FAMILIES = ("sd15", "sdxl")  # the prompt is CLIP-L (SD1.5) or CLIP-L + CLIP-G (SDXL) text tokens


# --- the job ----------------------------------------------------------------------------------------------------------
def flex_params(values: dict) -> fp.FlexParams:
    return fp.FlexParams(
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
    params: fp.FlexParams
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
    expected = fp.SDXL_L_DIM + fp.SDXL_G_DIM if family == "sdxl" else fp.SDXL_L_DIM
    if emb.shape[-1] != expected:
        raise ImgcondError(
            f"{TECHNIQUE}: the {what} embedding is {emb.shape[-1]}-d, expected {expected}-d for "
            f"{forge.FAMILY_LABELS[family]}"
        )
    emb = emb[:1].detach().float().cpu().clone()
    return list(fd.split_sdxl(emb)) if family == "sdxl" else [emb]


def plan(p: Any, values: dict, extra_images: list[tuple[ImageInput, float]], extra_dir: str = "") -> Job:
    """Validate and prepare everything a job needs, before any sampling; raise ImgcondError otherwise."""
    family = forge.require_family(p.sd_model, FAMILIES, TECHNIQUE, FLEXDIFFUSE.reason)
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
        tokens = encode_images(model, [img for img, _ in images], params.compatible, encoders.job_encodings(p))
        if values["direct"] and tokens[0].shape[0] < fp.CHUNK:
            raise ImgcondError(
                f"{TECHNIQUE}: direct image guidance needs at least {fp.CHUNK} image tokens, "
                f"{cfg.source} gives {tokens[0].shape[0]}"
            )
        weighted = list(zip(tokens, [w for _, w in images], strict=True))
        halves.append(Half(role, HALVES[role][1], path, choice_label(path, extra_dir), weighted))
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
    reps = length // fp.CHUNK
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
    if cond.dim() != 3 or cond.shape[1] % fp.CHUNK:
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
