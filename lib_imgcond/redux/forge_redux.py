"""Flux Redux on Forge: per-job planning (prepare + encode once) and the pass patches (model files: forge_files).

`plan` runs in `process()`: it checks the model family, the files and every reference image, and encodes the images
(so every user error surfaces before sampling) inside the host's model management, once per image and job.
`install` puts two things on the pass's UnetPatcher clone:

* a conditioning modifier that appends the Redux tokens to the *positive* conditioning of every model evaluation
  (fresh dicts, never the cached prompt conditioning). Both cond and uncond cross-attention conditions are wrapped in
  a strict variant of Forge's `ConditionCrossAttn` that refuses to batch different lengths: Forge would otherwise
  repeat the shorter uncond context to a common length, which changes Flux's joint attention. The uncond context is
  never altered, so the uncond prediction stays exactly what it is without Redux.
* for `attn_bias` strengths ≠ 1, a log-strength key bias on the Redux columns (`forge_bias`: Neo's block replaces
  with a mask, or on Forge 2.0 a swap of `backend.nn.flux.attention` for one model call, restored in `finally`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from lib_imgcond.common import window
from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.common.log import logger
from lib_imgcond.host import forge
from lib_imgcond.redux import forge_bias as redux_bias
from lib_imgcond.redux import image as redux_image
from lib_imgcond.redux import projector as redux_projector
from lib_imgcond.redux import token_merge as tm
from lib_imgcond.redux import tokens as rx
from lib_imgcond.redux.forge_files import (
    _check_redux_file,
    choice_label,
    compute_device_dtype,
    load_model,
    resolve,
    vision_config,
    weights_key,
)
from lib_imgcond.redux.spec import MERGE_FIELDS, SLOT_FIELDS, SLOTS, slot_values
from lib_imgcond.spec.families import REDUX
from lib_imgcond.vision import forge_encoders as encoders

FAMILIES = ("flux", "chroma")  # T5-space text tokens first, then image tokens: Redux tokens are appended text
_LOCK = threading.Lock()
_ENCODE_LOCK = threading.Lock()  # one encoding at a time
# Raw tokens of the images encoded last (by a preview or a job), so the panel's token count can show what merging
# leaves. Only the panel reads it; a job encodes through its own per-job cache (`encoders.job_encodings`).
_ENCODINGS: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_ENCODINGS_MAX = 8


# --- images -----------------------------------------------------------------------------------------------------------
def pil_to_tensor(img) -> torch.Tensor:
    import numpy as np

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def mask_to_tensor(img) -> torch.Tensor:
    import numpy as np

    if img.mode in ("RGBA", "LA"):
        img = img.getchannel("A")
    arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())


def tensor_to_pil(x: torch.Tensor):
    import numpy as np
    from PIL import Image

    arr = (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
    if arr.ndim == 3:
        return Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), "RGB")
    return Image.fromarray(arr, "L")


def slot_mask(slot: dict):
    """The slot's mask as a PIL image: the uploaded `mask` wins over one drawn on the image."""
    if slot.get("mask") is not None:
        return slot["mask"].image
    image = slot.get("image")
    return None if image is None else image.mask


def prepare_slot(slot: dict, k: int, size: int, patch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image (3,S,S), mask (S,S) | None) for slot `k`; errors name the slot. A mask that covers no token of the
    encoder's patch grid is refused here (as selecting nothing)."""
    mask = slot_mask(slot)
    try:
        return redux_image.prepare(
            pil_to_tensor(slot["image"].image),
            None if mask is None else mask_to_tensor(mask),
            slot["mode"],
            size,
            float(slot["margin"]),
            patch=patch,
        )
    except ImgcondError as e:
        raise ImgcondError(f"Redux image {k}: {e}") from None


def active_slots(values: dict) -> list[int]:
    return [k for k in range(1, SLOTS + 1) if values[f"use{k}"] and values[f"image{k}"] is not None]


# --- tokens -----------------------------------------------------------------------------------------------------------
def process_tokens(raw: torch.Tensor, slot: dict, tmask_full: torch.Tensor | None) -> torch.Tensor:
    """Raw Redux tokens (1, P², D) of one image → the tokens to append (1, N, D) after the slot's token control
    (preset, or downsampling + mask selection), token merging, weight² and a `multiply` strength."""
    if slot["control"] != "advanced":
        tokens = rx.preset_tokens(raw, slot["control"])
    else:
        tokens, tmask = rx.downsample(raw, float(slot["factor"]), slot["interpolation"], tmask_full)
        tokens = rx.select(tokens, tmask)
    if slot["automerge"]:
        tokens = tm.automerge(tokens, float(slot["merge_threshold"]))[0].unsqueeze(0)
    tokens = rx.apply_weight(tokens, float(slot["weight"]))
    if slot["strength_type"] == "multiply":
        tokens = tokens * float(slot["strength"])
    return tokens


def count_tokens(slot: dict, tmask_full: torch.Tensor | None, grid: int) -> int:
    if slot["control"] != "advanced":
        f = rx.PRESETS[slot["control"]]
        return grid * grid if f == 1 else max(1, grid // f) ** 2
    return rx.token_count(float(slot["factor"]), slot["interpolation"], tmask_full, grid)


def describe_counts(values: dict, size: int = 384, patch: int = 14, raw_tokens=None) -> tuple[str, list]:
    """Token counts per used slot (for the UI) and the prepared (image, mask) PIL pairs. Errors become text.

    How far merging shrinks a slot depends on the image's tokens: `raw_tokens(k, prepared_image)` gives the raw
    tokens (1, P², D), or None when they are not known yet (see :func:`token_source`); the count is then an upper
    bound and says so.
    """
    grid = size // patch
    parts, total, previews, bound = [], 0, [], False
    for k in active_slots(values):
        slot = slot_values(values, k)
        try:
            image, mask = prepare_slot(slot, k, size, patch)
            tmask = rx.token_mask(mask, patch) if (mask is not None and slot["control"] == "advanced") else None
            n = count_tokens(slot, tmask, grid)
            if n == 0:
                raise ImgcondError("the mask selects no token; paint a larger region or remove the mask")
            raw = raw_tokens(k, image) if (slot["automerge"] and raw_tokens is not None) else None
        except ImgcondError as e:
            parts.append(f"image {k}: ⚠️ {e}")
            continue
        previews.append((tensor_to_pil(image), None if mask is None else tensor_to_pil(mask), k))
        if slot["automerge"] and raw is not None:
            merged = int(process_tokens(raw, slot, tmask).shape[1])
            parts.append(f"image {k}: {merged} (merged from {n})")
            n = merged
        elif slot["automerge"]:
            bound = True
            parts.append(f"image {k}: at most {n} (merged once encoded: preview or generate)")
        else:
            parts.append(f"image {k}: {n}")
        total += n
    if not parts:
        return "No reference image yet: 0 tokens.", previews
    amount = f"at most {total}" if bound else str(total)
    return f"**{amount} Redux tokens** will be appended ({', '.join(parts)}).", previews


def _model_key(siglip_path: str, redux_path: str, dtype: torch.dtype) -> tuple:
    return (weights_key(siglip_path, dtype), weights_key(redux_path, dtype))


def token_source(values: dict, compute: bool = False):
    """`raw_tokens` for :func:`describe_counts`: the cached encoding of a prepared image under the chosen models
    (None until a generation or preview encoded it), or with `compute` the encoding itself (loads the models).
    None when the model files cannot be resolved."""
    try:
        siglip_path = resolve("siglip", values["siglip"])
        redux_path = resolve("redux", values["redux_model"])
    except (ImgcondError, OSError):
        return None
    _device, dtype = compute_device_dtype()
    model_key = _model_key(siglip_path, redux_path, dtype)

    def raw_tokens(k: int, image: torch.Tensor) -> torch.Tensor | None:
        with _LOCK:
            known = _ENCODINGS.get((*model_key, encoders.content_hash(image)))
        if known is not None or not compute:
            return known
        return encode(load_model("siglip", siglip_path, dtype), load_model("redux", redux_path, dtype), image)

    return raw_tokens


@dataclass
class Span:
    slot: int
    start: int  # offset inside the Redux block
    count: int
    bias_strength: float | None  # attn_bias strength, None for multiply


@dataclass
class Job:
    values: dict
    tokens: torch.Tensor  # (1, N, D) float32 on the CPU, every used slot in order
    spans: list[Span] = field(default_factory=list)
    siglip: str = ""
    redux: str = ""

    @property
    def count(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def needs_bias(self) -> bool:
        return any(s.bias_strength is not None and s.bias_strength != 1.0 and s.count for s in self.spans)


def encode(
    vision: encoders.Managed, projector: encoders.Managed, image: torch.Tensor, cache: encoders.Encodings | None = None
) -> torch.Tensor:
    """Raw tokens (1, P², D) float32 CPU for one prepared image, on the device the host loads the two models to;
    with the job's `cache` an image already encoded this job (same prepared pixels and models) is not encoded again."""
    digest = encoders.content_hash(image)

    def run() -> torch.Tensor:
        with _ENCODE_LOCK:
            device = encoders.use_together(vision, projector)
            return redux_projector.encode_tokens(vision.module, projector.module, image[None].to(device)).float().cpu()

    key = ("redux-tokens", vision.key, projector.key, digest)
    tokens = run() if cache is None else cache.get(key, run)
    with _LOCK:
        memo = (vision.key, projector.key, digest)
        _ENCODINGS[memo] = tokens
        _ENCODINGS.move_to_end(memo)
        while len(_ENCODINGS) > _ENCODINGS_MAX:
            _ENCODINGS.popitem(last=False)
    return tokens


def plan(p: Any, values: dict) -> Job:
    """Validate and encode everything a job needs before any sampling; raise a clear ImgcondError otherwise."""
    forge.require_family(p.sd_model, FAMILIES, "Redux", REDUX.reason)
    window.check(float(values["start"]), float(values["end"]), "redux")
    slots = active_slots(values)
    if not slots:
        raise ImgcondError("Redux is on but no image slot has an image: give image1 (or turn Redux off)")
    siglip_path = resolve("siglip", values["siglip"])
    redux_path = resolve("redux", values["redux_model"])
    cfg = vision_config(siglip_path)
    _check_redux_file(redux_path)
    prepared = {k: prepare_slot(slot_values(values, k), k, cfg.image_size, cfg.patch) for k in slots}
    _device, dtype = compute_device_dtype()
    vision = load_model("siglip", siglip_path, dtype)
    projector = load_model("redux", redux_path, dtype)
    cache = encoders.job_encodings(p)
    pieces, spans, offset = [], [], 0
    for k in slots:
        slot = slot_values(values, k)
        image, mask = prepared[k]
        raw = encode(vision, projector, image, cache)
        tmask = rx.token_mask(mask, cfg.patch) if (mask is not None and slot["control"] == "advanced") else None
        tokens = process_tokens(raw, slot, tmask)
        n = int(tokens.shape[1])
        if n == 0:  # prepare_slot refuses masks without a token; this guards the downsampled mask too
            raise ImgcondError(f"Redux image {k}: the mask selects no token; paint a larger region or remove the mask")
        bias = float(slot["strength"]) if slot["strength_type"] == "attn_bias" else None
        spans.append(Span(k, offset, n, bias))
        pieces.append(tokens)
        offset += n
    siglip, redux = choice_label("siglip", siglip_path), choice_label("redux", redux_path)
    job = Job(values, torch.cat(pieces, dim=1), spans, siglip, redux)
    logger.info("Redux: %d tokens from image(s) %s", job.count, ", ".join(str(s.slot) for s in spans))
    return job


def infotext_skip(values: dict) -> list[str]:
    """Parameters of unused slots, and the merge parameters of slots that do not merge, are left out of the
    infotext (so an image without merging has the same infotext as before merging existed)."""
    used = set(active_slots(values))
    skip = [f"{name}{k}" for k in range(1, SLOTS + 1) if k not in used for name in SLOT_FIELDS]
    return skip + [f"{name}{k}" for k in sorted(used) if not values[f"automerge{k}"] for name in MERGE_FIELDS]


# --- the patches ----------------------------------------------------------------------------------------------------
_STRICT_CLASS: dict[str, type] = {}


def strict_cross_attn_class() -> type:
    """Forge's ConditionCrossAttn that only batches identical lengths (never repeats a shorter context)."""
    cls = _STRICT_CLASS.get("cls")
    if cls is None:
        from backend.sampling.condition import ConditionCrossAttn

        class StrictCrossAttn(ConditionCrossAttn):
            def can_concat(self, other):
                return tuple(self.cond.shape) == tuple(other.cond.shape)

            def concat(self, others):
                return torch.cat([self.cond, *(o.cond for o in others)])

        cls = _STRICT_CLASS["cls"] = StrictCrossAttn
    return cls


def in_window(model: Any, sigma: float, start: float, end: float) -> bool:
    """Whether `sigma` lies in the [start, end] fraction of the denoising (Forge's percent_to_sigma)."""
    return window_test(model, start, end)(sigma)


def window_test(model: Any, start: float, end: float):
    """`inside(sigma)` for the step window of `model` (common.window; the bounds computed once)."""
    predictor = getattr(model, "predictor", None)
    return window.sigma_test(start, end, None if predictor is None else predictor.percent_to_sigma)


class PassState:
    """What the modifier learned about the current denoiser call (`active`), and the bias of the model call under
    way (`call`, set by the bias wrapper; `biased_calls` counts them)."""

    def __init__(self):
        self.active = False
        self.call = None
        self.biased_calls = 0


def _rewrap(entries, cls, tokens_like=None):
    if entries is None:
        return None
    out = []
    for entry in entries:
        entry = dict(entry)
        conds = dict(entry["model_conds"])
        context = conds["c_crossattn"].cond
        if tokens_like is not None:
            extra = tokens_like(context).expand(context.shape[0], -1, -1)
            context = torch.cat([context, extra], dim=1)
        conds["c_crossattn"] = cls(context)
        entry["model_conds"] = conds
        out.append(entry)
    return out


def make_modifier(job: Job, state: PassState):
    start, end = float(job.values["start"]), float(job.values["end"])
    placed: dict[tuple, torch.Tensor] = {}  # the tokens moved once per device/dtype, not once per model call

    def tokens_like(context: torch.Tensor) -> torch.Tensor:
        key = (context.device, context.dtype)
        if key not in placed:
            placed[key] = job.tokens.to(device=context.device, dtype=context.dtype)
        return placed[key]

    tests: dict[int, Any] = {}  # one window test per model object (the pass's model)

    def modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        inside = tests.get(id(model))
        if inside is None:
            inside = tests[id(model)] = window_test(model, start, end)
        state.active = inside(float(timestep.flatten()[0]))
        if state.active:
            cls = strict_cross_attn_class()
            cond = _rewrap(cond, cls, tokens_like)
            uncond = _rewrap(uncond, cls, None)  # same tensors: only forbids repeating it to cond's length
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    return modifier


def install(unet: Any, job: Job) -> PassState:
    """Patch one pass's UnetPatcher clone."""
    state = PassState()
    unet.add_conditioning_modifier(make_modifier(job, state))
    if job.needs_bias:
        redux_bias.install(unet, job, state)
    return state
