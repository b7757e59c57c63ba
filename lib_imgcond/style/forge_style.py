"""Style model (T2I-Adapter style) on Forge: adapter files, per-job encoding, the conditioning modifier and the bias.

`plan` runs in `process()`: it checks the model family (SD1.5 only), the CLIP ViT-L/14 encoder (found and loaded by
CLIP image guidance's own functions) and the adapter file, prepares every image like Redux (crop / letterbox /
autocrop around a mask), encodes it once per job and runs the adapter, so every user error surfaces before sampling.
`install` puts on the pass's UnetPatcher clone a conditioning modifier that appends the style tokens to the
*positive* cross-attention context inside the step window (cond and uncond wrapped in Redux's strict class, so Forge
never repeats the shorter uncond context to batch them), and for an `attn_bias` strength an attn2 replace that adds
log(strength) to the style columns' attention logits of cond rows.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lib_imgcond.common import window
from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.common.log import logger
from lib_imgcond.flexdiffuse import forge_encoders
from lib_imgcond.host import forge
from lib_imgcond.redux import forge_redux as redux_host
from lib_imgcond.redux import image as redux_image
from lib_imgcond.redux import tokens as rx
from lib_imgcond.spec.families import STYLE
from lib_imgcond.style import adapter as sa
from lib_imgcond.style.spec import AUTO, SLOT_FIELDS, SLOTS, slot_values, used_slots
from lib_imgcond.vision import forge_encoders as encoders

TECHNIQUE = "Style model"  # the accordion title: every error, also of the shared encoder helpers, names it
PREFIX = "style_model"  # the spec's argument prefix
FAMILIES = ("sd15",)
OWN_FOLDER = ("imgcond", "style")
CONTROLNET_FOLDER = ("ControlNet",)  # where WebUI users keep t2iadapter_style_sd14v1.pth; files named *style* only
EXTENSIONS = (".safetensors", ".pth")
_LOCK = threading.Lock()
_ADAPTER: dict[str, tuple[tuple, sa.StyleAdapter]] = {}


# --- adapter files ----------------------------------------------------------------------------------------------------
def adapter_dirs() -> list[str]:
    return [forge.models_dir(*OWN_FOLDER), forge.models_dir(*CONTROLNET_FOLDER)]


def list_adapters() -> list[str]:
    """Adapter file names: every .safetensors/.pth of models/imgcond/style, then the *style* ones of ControlNet's."""
    names: list[str] = []
    for i, folder in enumerate(adapter_dirs()):
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            low = name.lower()
            if not low.endswith(EXTENSIONS) or name in names or (i > 0 and "style" not in low):
                continue
            if os.path.isfile(os.path.join(folder, name)):
                names.append(name)
    return names


def resolve_adapter(value: str) -> str:
    dirs = adapter_dirs()
    where = " or ".join(dirs)
    name = (value or "").strip()
    if name.lower() in ("", AUTO.lower(), "auto"):
        names = list_adapters()
        if not names:
            raise ImgcondError(
                f"{TECHNIQUE} needs a T2I-Adapter style model (t2iadapter_style_sd14v1.pth or .safetensors), but "
                f"none is in {where} (ControlNet folder: files with 'style' in the name)"
            )
        name = names[0]
    if os.path.basename(name) != name or name.startswith("."):
        raise ArgumentError("style_model.adapter", name, f"a file name from {where} (no folders)")
    for folder in dirs:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise ImgcondError(f"{TECHNIQUE}: the style adapter '{name}' is not in {where}")


def read_state(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file: .safetensors, or a .pth read with torch.load(weights_only=True) that must hold
    a plain {name: tensor} state dict."""
    name = os.path.basename(path)
    if name.lower().endswith(".safetensors"):
        import safetensors.torch

        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as e:
            raise ImgcondError(f"{TECHNIQUE}: cannot read {name} as a .safetensors file ({e})") from None
    if not name.lower().endswith(".pth"):
        raise ImgcondError(f"{TECHNIQUE}: {name} is neither .safetensors nor .pth")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ImgcondError(
            f"{TECHNIQUE}: {name} is not a plain state dict: torch.load(weights_only=True) refused it "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}). Use a .safetensors copy."
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        kind = type(state).__name__ if not isinstance(state, dict) else "a dict holding non-tensor values"
        raise ImgcondError(f"{TECHNIQUE}: {name} is not a plain state dict of tensors (it holds {kind})")
    return state


def load_adapter(path: str) -> sa.StyleAdapter:
    """The adapter in `path` (float32, CPU: a few MB of compute per image), loaded once and kept."""
    stat = os.stat(path)
    key = (stat.st_mtime_ns, stat.st_size)
    with _LOCK:
        hit = _ADAPTER.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        model = sa.load_style_adapter(read_state(path), source=os.path.basename(path))
        _ADAPTER.clear()
        _ADAPTER[path] = (key, model)
        logger.info("%s: loaded %s (%d tokens)", TECHNIQUE, os.path.basename(path), model.config.tokens)
        return model


# --- the job ----------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    values: dict
    tokens: torch.Tensor  # (1, N, C) float32 CPU, the used slots in order; N = 0 when every weight is 0
    encoder: str
    adapter: str

    @property
    def count(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def bias_strength(self) -> float | None:
        v = self.values
        return float(v["strength"]) if v["strength_type"] == "attn_bias" and v["strength"] != 1.0 else None


@torch.no_grad()
def encode_hidden(model: encoders.Managed, image: torch.Tensor) -> torch.Tensor:
    """CLIP vision `last_hidden_state` (1, 1 + P², W) float32 CPU of one prepared (3, S, S) image; the encoder is
    loaded through the host's model management."""
    return model.encode(image[None]).last_hidden_state.float().cpu()


def plan(p: Any, values: dict, extra_dir: str = "") -> Job:
    """Validate and encode everything a job needs before any sampling; raise ImgcondError otherwise."""
    forge.require_family(p.sd_model, FAMILIES, TECHNIQUE, STYLE.reason)
    window.check(float(values["start"]), float(values["end"]), PREFIX)
    slots = used_slots(values)
    if not slots:
        raise ImgcondError(f"{TECHNIQUE} is on but no style image was given: add image1, or turn {TECHNIQUE} off")
    enc_path, cfg = forge_encoders.resolve(values["encoder"], "L", "sd15", extra_dir, TECHNIQUE, PREFIX)
    adapter_path = resolve_adapter(values["adapter"])
    adapter = load_adapter(adapter_path)
    acfg, aname = adapter.config, os.path.basename(adapter_path)
    if acfg.context_dim != 768:
        raise ImgcondError(f"{TECHNIQUE}: {aname} makes {acfg.context_dim}-d tokens; SD1.5's context is 768-d")
    if acfg.width != cfg.hidden:
        raise ImgcondError(
            f"{TECHNIQUE}: {aname} takes {acfg.width}-d CLIP vision states but {os.path.basename(enc_path)} gives "
            f"{cfg.hidden}-d ({cfg.name}); use the CLIP ViT-L/14 vision encoder"
        )
    encoder = forge_encoders.load_encoder(enc_path, TECHNIQUE)
    strength = float(values["strength"])
    pieces = []
    for k in slots:
        slot = slot_values(values, k)
        image_in = slot["image"]
        mask_in = values.get(f"mask{k}")  # uploaded or painted in the UI: wins over a mask the image carries
        mask_img = image_in.mask if mask_in is None else mask_in.image
        try:
            image, mask = redux_image.prepare(
                redux_host.pil_to_tensor(image_in.image),
                None if mask_img is None else redux_host.mask_to_tensor(mask_img),
                slot["mode"],
                cfg.image_size,
                float(values["margin"]),
                patch=cfg.patch,
            )
        except ImgcondError as e:
            raise ImgcondError(f"{TECHNIQUE} image {k}: {e}") from None
        if slot["weight"] == 0 or strength == 0:
            continue  # checked, but adds nothing: weight 0 (or strength 0) is exactly off
        hidden = encode_hidden(encoder, image)
        tmask = None if mask is None else rx.token_mask(mask, cfg.patch)
        tokens = adapter(sa.select_tokens(hidden, tmask)).float() * float(slot["weight"])
        if not bool(torch.isfinite(tokens).all()):
            raise ImgcondError(f"{TECHNIQUE} image {k}: the style tokens are NaN/inf; the files may be damaged")
        pieces.append(tokens)
    if pieces and values["strength_type"] == "multiply":
        pieces = [t * strength for t in pieces]
    tokens = torch.cat(pieces, dim=1) if pieces else torch.zeros(1, 0, acfg.context_dim)
    job = Job(values, tokens, os.path.basename(enc_path), aname)
    logger.info("%s: %d tokens from image(s) %s", TECHNIQUE, job.count, ", ".join(map(str, slots)))
    return job


def infotext(job: Job, spec) -> dict[str, Any]:
    values = {**job.values, "encoder": job.encoder, "adapter": job.adapter}
    used = set(used_slots(job.values))
    skip = [f"{name}{k}" for k in range(1, SLOTS + 1) if k not in used for name in SLOT_FIELDS]
    if not any(job.values[f"mode{k}"] == "autocrop" for k in used):
        skip.append("margin")
    return spec.infotext(values, skip=skip)


# --- the patches ------------------------------------------------------------------------------------------------------
class PassState:
    def __init__(self):
        self.active = False


def make_modifier(job: Job, state: PassState, percent_to_sigma):
    inside = window.sigma_test(float(job.values["start"]), float(job.values["end"]), percent_to_sigma)
    placed: dict[tuple, torch.Tensor] = {}

    def tokens_like(context: torch.Tensor) -> torch.Tensor:
        key = (context.device, context.dtype)
        if key not in placed:
            placed[key] = job.tokens.to(device=context.device, dtype=context.dtype)
        return placed[key]

    def modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        state.active = bool(cond) and inside(float(torch.as_tensor(timestep).flatten()[0]))
        if state.active:
            cls = redux_host.strict_cross_attn_class()
            cond = redux_host._rewrap(cond, cls, tokens_like)
            uncond = redux_host._rewrap(uncond, cls, None)
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    return forge.mark_ours(modifier)


def key_bias(job: Job, rows: list, batch: int, length: int, dtype, device) -> torch.Tensor | None:
    """(batch, 1, 1, length) bias: log(strength) on the last `job.count` columns of cond rows, or None."""
    if 0 not in rows or length < job.count or not rows:
        return None
    row = sa.attention_bias(length, (length - job.count, length), job.bias_strength, dtype=dtype, device=device)
    out = torch.zeros(batch, 1, 1, length, dtype=dtype, device=device)
    chunk = batch // len(rows)
    for i, branch in enumerate(rows):
        if branch == 0:
            out[i * chunk : (i + 1) * chunk, 0, 0] = row
    return out


def make_attn2(job: Job, state: PassState, kernel):
    def attn2(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        rows = list(extra_options.get("cond_or_uncond") or [])
        bias = key_bias(job, rows, q.shape[0], k.shape[1], q.dtype, q.device) if state.active else None
        if bias is None:
            return kernel(q, k, v, heads)
        b, n, inner = q.shape
        d = inner // heads
        qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias)
        return out.transpose(1, 2).reshape(b, n, inner)

    return forge.mark_ours(attn2)


def install(unet: Any, job: Job) -> PassState | None:
    """Patch one pass's UnetPatcher clone (nothing when no token is appended: weight or strength 0)."""
    if job.count == 0:
        return None
    state = PassState()
    predictor = getattr(unet.model, "predictor", None)
    unet.add_conditioning_modifier(make_modifier(job, state, getattr(predictor, "percent_to_sigma", None)))
    if job.bias_strength is not None:
        replaces = unet.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        if any(not getattr(fn, "_imgcond", False) for fn in replaces.values()):
            forge.refuse_sampling(
                unet,
                ImgcondError(
                    f"{TECHNIQUE}: strength type attn_bias cannot be combined with another extension's cross-attention "
                    "replace (e.g. IP-Adapter); use strength type multiply"
                ),
            )
            return state
        unet.set_model_replace_all(make_attn2(job, state, forge.attention_kernel()), "attn2")
    return state
