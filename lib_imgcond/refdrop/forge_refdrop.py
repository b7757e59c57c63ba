"""RefDrop on Forge: record self-attention K/V into named references and blend attention over them.

This module plans a job (`Job`, `plan`: family, layers, references to use, the RAM estimate of a Record) and finishes
it (`finish_record`, `release`); `forge_install` puts the patches on the pass's UnetPatcher clone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.common.log import logger
from lib_imgcond.host import dit_attention, forge, samplers, video
from lib_imgcond.host.sites import registry as sites
from lib_imgcond.memory import arena
from lib_imgcond.refdrop import batch as cb
from lib_imgcond.refdrop import checks, file_format, reference
from lib_imgcond.refdrop import forge_consistent as consistent
from lib_imgcond.refdrop import forge_library as library
from lib_imgcond.refdrop import forge_replay as replay
from lib_imgcond.refdrop import layers as rd
from lib_imgcond.refdrop import precision as prec
from lib_imgcond.refdrop import trajectory as rtraj
from lib_imgcond.refdrop.families import DIT, dit_family, dit_shape
from lib_imgcond.refdrop.forge_library import REFERENCES, check_name, lookup
from lib_imgcond.refdrop.forge_patch import PassTracker, refuse_incomplete
from lib_imgcond.spec.families import REFDROP

MODES = ("Record", "Use", "Image", consistent.MODE)
PRECISIONS = prec.PRECISIONS
precision_from_settings = prec.from_settings
FAMILIES = ("sd15", "sdxl", *DIT)  # the families RefDrop serves; others are refused by name


def release(job: Job) -> None:
    """After a job: drop its hold on reference tensors. Its patched UnetPatcher clone stays on the model until the
    next generation, and the patch closures reach the job, so without this a deleted or replaced reference would
    stay in memory until then."""
    job.uses.clear()  # the passes' reference sources share this list
    for source in job.sources:
        source.release()
    job.sources.clear()
    job.record, job.image_latent, job.trajectory, job.capture_target = None, None, None, None
    job.flushers.clear()
    job.pool.clear()
    arena.trim_host_memory()


# --- per-job state --------------------------------------------------------------------------------------------------
def parse_more(text: str) -> list[tuple[str, float]]:
    """'cat:0.3, dog:-0.2' → [('cat', 0.3), ('dog', -0.2)]."""
    out = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, coef = part.rpartition(":")
        try:
            c = float(coef)
        except ValueError:
            c = None
        if not sep or c is None or not -1.0 <= c <= 1.0:
            raise ArgumentError("refdrop.more_references", part, "entries 'name:c' with c in [-1, 1], comma-separated")
        out.append((check_name(name), c))
    return out


@dataclass
class Job:
    values: dict
    family: str
    layers: frozenset
    uses: list[tuple[reference.Reference, float]] = field(default_factory=list)
    record: reference.Reference | None = None
    budget: int = 0
    image_latent: torch.Tensor | None = None  # mode Image: the VAE-encoded reference image (`encode_image`)
    image_seed: int = 0
    capturing: bool = False
    captured_eval: tuple = ()
    flushers: list = field(default_factory=list)  # per pass: move the last evaluation's recorded K/V to the host
    sources: list = field(default_factory=list)  # per pass: its ReferenceSource (released after the job)
    iteration: int = 0  # mode Batch: which batch of the job is sampling (p.iteration)
    batch_seed: int = 0  # mode Batch: that batch's first seed (seeds the shared-token subsets)
    pool: dict = field(default_factory=dict)  # mode Batch, first batch as reference: site -> kept (k, v) on the host
    pool_bytes: int = 0

    @property
    def record_every(self) -> int:
        """Record mode: keep every k-th model evaluation (Image mode captures each one it blends)."""
        return int(self.values.get("record_every") or 1) if self.values["mode"] == "Record" else 1

    trajectory: rtraj.Trajectory | None = None  # Record with trajectory storage: the model calls' inputs
    capture_target: Any = None  # while a trajectory replays: that reference (its K/V go to the live table only)
    capture_branches: tuple = (0,)
    capture_eval: int = 0

    @property
    def recording(self) -> bool:
        """True while K/V must be stored: the whole pass in Record mode (K/V storage), the reference forward in
        Image mode, a trajectory's replay in Use."""
        return self.capturing or (self.record is not None and self.values["mode"] == "Record")


def plan(
    p: Any, values: dict, budget_bytes: int, precision: str | bool = prec.AS_COMPUTED, gpu_share: float = 0.0
) -> Job:
    """Validate everything a job needs before any sampling; raise a clear ImgcondError otherwise. `precision`: the
    storage precision of a Record (`precision.PRECISIONS`; a bool is the older fp16 switch); `gpu_share`:
    the share of GPU memory recordings may stay in (`library.gpu_for`)."""
    if isinstance(precision, bool):
        precision = prec.FP16 if precision else prec.AS_COMPUTED
    precision = prec.check_precision(precision)
    family, layers = _family_and_layers(p, values)
    batch, frames = video.model_batch(p), video.clip_frames(p)
    if values["batch_item"] >= batch:
        clip = " (a Wan video generation samples one clip: its batch size counts the clip's frames)" if frames else ""
        raise ArgumentError("refdrop.batch_item", values["batch_item"], f"an index below the batch size {batch}{clip}")
    if values["mode"] == "Image" and batch > 1 and (dit_shape(family) or ("",))[0] == "pid":
        # PidNet gates each row's image tokens with that row's low-quality input: a batch holds one per image, and
        # the reference image's forward (one row) would meet all of them
        allowed = (
            "Record or Use on PiD at batch size above 1 (PiD takes one low-quality input per image), or batch size 1"
        )
        raise ArgumentError("refdrop.mode", "Image", allowed)
    hires = bool(getattr(p, "enable_hr", False)) and values["hires"]
    if values["mode"] == consistent.MODE:
        return _plan_batch(p, values, family, layers, hires, budget_bytes)
    name = check_name(values["reference"])
    job = Job(values, family, layers, budget=budget_bytes)
    if values.get("storage") == "Trajectory" and values["mode"] != "Use":
        if values["mode"] != "Record":
            raise ArgumentError("refdrop.storage", "Trajectory", "'K/V' in mode Image (it keeps the K/V it captures)")
        if dit_shape(family) is not None:
            allowed = f"'K/V' on {rd.family_label(family)} (trajectory references are recorded on SD1.5 and SDXL)"
            raise ArgumentError("refdrop.storage", "Trajectory", allowed)
        meta = {"width": int(p.width), "height": int(p.height), "source": "generation"}
        job.trajectory = rtraj.Trajectory(name, family, meta)
        return job
    if values["mode"] in ("Record", "Image"):
        record = values["mode"] == "Record"
        rows = 2 if values["uncond"] and record else 1
        nbytes = prec.BYTES[precision] if record else 4
        needed = _estimate(p, family, layers, hires, rows, nbytes, job.record_every)
        checks.check_budget(needed, budget_bytes)
    if values["mode"] == "Record":
        meta = {"width": int(p.width), "height": int(p.height), "source": "generation", "trace": {}, "sampler": {}}
        meta["record_every"] = job.record_every
        keep_on = library.gpu_for(forge.load_device(p), needed, gpu_share, name)
        job.record = reference.Reference(name, family, meta, precision=precision, keep_on=keep_on)
        return job
    more = parse_more(values["more_references"])
    if values["mode"] == "Image":
        if values["image"] is None:
            raise ArgumentError("refdrop.image", None, "an image: mode Image takes its reference from it")
        meta = {"width": int(p.width), "height": int(p.height), "source": "image", "trace": {}}
        job.record = reference.Reference(name, family, meta, store_fp16=False)
        job.uses.append((job.record, values["coefficient"]))
        job.image_seed = int(getattr(p, "seed", 0) or 0)
    else:
        more.insert(0, (name, values["coefficient"]))
    passes = {"first"} | ({"hires"} if hires else set())
    for ref_name, c in more:
        ref = lookup(ref_name)
        checks.check_compatible(ref, family, set(layers), passes)
        job.uses.append((ref, c))
    return job


def _family_and_layers(p: Any, values: dict) -> tuple[str, frozenset]:
    family = forge.require_family(p.sd_model, FAMILIES, "RefDrop", REFDROP.reason)
    if family in DIT:  # tagged with its layer shapes: a reference never crosses DiT architectures
        model = p.sd_model.forge_objects.unet.model.diffusion_model
        site = sites.site(family)
        if site is None:  # Flux's own blocks
            from lib_imgcond.refdrop import forge_dit as refdrop_dit

            double, single, channels = refdrop_dit.blocks(model)
            family = dit_family(family, (double, single), channels)
        else:
            family = dit_family(family, dit_attention.counts(site, model), site.channels(model))
    layers = frozenset(tuple(x[:3]) for x in rd.parse_layers(values["layers"], family))
    if not layers:
        raise ArgumentError("refdrop.layers", values["layers"], "at least one layer")
    return family, layers


def estimate_record(p: Any, values: dict, precision: str) -> int:
    """Bytes a Record with these values would take on `p` (its size, steps, sampler, hires settings, loaded model),
    at this storage precision: the figure the budget check uses."""
    family, layers = _family_and_layers(p, values)
    hires = bool(getattr(p, "enable_hr", False)) and values["hires"]
    every = int(values.get("record_every") or 1)
    rows = 2 if values["uncond"] else 1
    return _estimate(p, family, layers, hires, rows, prec.BYTES[prec.check_precision(precision)], every)


def _plan_batch(p: Any, values: dict, family: str, layers: frozenset, hires: bool, budget_bytes: int) -> Job:
    """Mode Batch: check the batch and the pool's budget, then write the prompt lines into the job's prompts (before
    any conditioning is computed, so each image's infotext shows its real prompt)."""
    if video.clip_frames(p) is not None:
        raise ImgcondError(
            "RefDrop mode Batch shares self-attention between the images of a batch, but a Wan video generation "
            "samples one clip (its batch size counts the clip's frames); use mode Record, Use or Image"
        )
    batch = int(getattr(p, "batch_size", 1))
    cb.check_batch(batch)
    cb.check_rate(values["rate"])
    if consistent.pool_mode(values) and int(getattr(p, "n_iter", 1)) > 1:
        branches = 2 if values["uncond"] else 1
        checks.check_budget(consistent.estimate(p, family, layers, hires, values["rate"], branches, 4), budget_bytes)
    if values["prompt_lines"].strip() and not getattr(p, "_imgcond_prompt_lines", False):
        p.all_prompts = cb.prompts_with_lines(p.all_prompts, batch, values["prompt_lines"])
        hr = getattr(p, "all_hr_prompts", None)
        if isinstance(hr, list) and len(hr) == len(p.all_prompts):
            p.all_hr_prompts = cb.prompts_with_lines(hr, batch, values["prompt_lines"])
        p._imgcond_prompt_lines = True  # once per job
    return Job(values, family, layers, budget=budget_bytes)


def infotext_skip(values: dict, n_iter: int) -> tuple[str, ...]:
    """Parameters whose effect a run does not have: the reference ones in mode Batch, the batch ones elsewhere."""
    if values["mode"] != consistent.MODE:
        return ("rate", "batch_sets")
    skip = ("reference", "more_references", "save", "batch_item")
    return skip if n_iter > 1 else (*skip, "batch_sets")


def _estimate(p: Any, family: str, layers: frozenset, hires: bool, rows: int, dtype_bytes: int, every: int = 1) -> int:
    """Bytes a recording will take: one K/V set per recorded model evaluation (every `every`-th), counted as the
    host counts them (its sampler configuration: twice per step for the samplers it marks second order). The
    recording itself counts its real evaluations and stops at the budget, so a sampler the host says nothing about
    is not refused early. A video clip's K/V hold every frame's tokens (`layer_shape` counts one image's)."""
    width, height = int(p.width), int(p.height)
    frames = video.clip_frames(p) or 1

    def shapes(w: int, h: int) -> list[tuple[int, int]]:
        return [(tokens * frames, channels) for tokens, channels in (rd.layer_shape(family, x, w, h) for x in layers)]

    steps = rd.recorded_count(samplers.evaluations(samplers.pass_sampler_name(p, hires=False), int(p.steps)), every)
    needed = checks.estimate_bytes(shapes(width, height), steps, rows, dtype_bytes)
    if hires:
        sw = int(getattr(p, "hr_upscale_to_x", 0) or width * 2)
        sh = int(getattr(p, "hr_upscale_to_y", 0) or height * 2)
        hr_steps = int(getattr(p, "hr_second_pass_steps", 0) or p.steps)
        hr_steps = rd.recorded_count(samplers.evaluations(samplers.pass_sampler_name(p, hires=True), hr_steps), every)
        needed += checks.estimate_bytes(shapes(sw, sh), hr_steps, rows, dtype_bytes)
    return needed


def encode_image(p: Any, image: Any) -> torch.Tensor:
    """The model's latent of a PIL image at the generation's size: (1, C, h, w), (1, C, 1, h, w) on Neo's engines with
    the Wan VAE, or on a pixel-space family (PiD, whose engine would also take an encoded image as its low-quality
    input) the image itself in [-1, 1]. The Wan-VAE engines are encoded by their VAE alone: their
    `encode_first_stage` also sets the engine's edit or video state (Anima's reference latent, Wan's first frame,
    Qwen-Image-Edit's image), which RefDrop's image must not. Neo's other edit engines (Flux Kontext, Flux.2) keep
    an encoded image as the next prompt's edit reference: what they held is put back."""
    import numpy as np

    img = image.convert("RGB").resize((int(p.width), int(p.height)))
    t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
    fam = DIT.get(forge.model_family(p.sd_model))
    if fam is not None and fam.pixel_space:
        return t * 2.0 - 1.0
    engine = p.sd_model
    if getattr(engine, "is_wan", False):
        with torch.no_grad():
            vae = engine.forge_objects.vae
            return vae.first_stage_model.process_in(vae.encode(t.movedim(1, -1))).detach()
    from modules import sd_samplers_common

    held = {name: getattr(engine, name) for name in ("ini_latent", "ref_latents") if hasattr(engine, name)}
    refs = list(held["ref_latents"]) if isinstance(held.get("ref_latents"), list) else None
    try:
        with torch.no_grad():
            return sd_samplers_common.images_tensor_to_samples(t, model=engine).detach()
    finally:
        for name, value in held.items():
            setattr(engine, name, value)
        if refs is not None:
            held["ref_latents"][:] = refs  # the same list object, as it was


def finish_record(
    job: Job, trackers: dict[str, PassTracker], save_file: bool, interrupted: bool = False, thumbnail: str = ""
) -> reference.Reference:
    """Keep the recording as a reference (and save it), or, when the job was interrupted or a pass stopped short of
    its last step, discard it and raise the message that says so: a partial reference would blend steps that were
    never recorded as if they were."""
    if job.trajectory is not None:
        return replay.finish(job, trackers, save_file, interrupted)
    for flush in job.flushers:
        flush()
    ref, job.record = job.record, None  # kept again below only when the recording is whole
    refuse_incomplete(ref.name, trackers, interrupted)
    job.record = ref
    every = job.record_every
    ref.meta["steps"] = {name: t.n_steps for name, t in trackers.items()}
    ref.meta["trace"] = {name: rd.recorded_trace(t.trace, every) for name, t in trackers.items()}
    ref.meta["record_every"] = every
    if thumbnail:
        ref.meta["thumbnail"] = thumbnail
    if job.values.get("uncond"):  # list the uncond branch only where it was recorded
        for name, t in trackers.items():
            ref.meta["trace"][f"{name}_uncond"] = rd.recorded_trace(t.trace, every)
            ref.meta["steps"][f"{name}_uncond"] = t.n_steps
    ref.finalize()
    with library._LOCK:
        replaced = REFERENCES.pop(ref.name, None)
        REFERENCES[ref.name] = ref
    if replaced is not None:
        del replaced
        arena.trim_host_memory()
    logger.info(
        "RefDrop reference '%s' recorded: %d tensors pairs, %s", ref.name, len(ref), arena.format_bytes(ref.nbytes)
    )
    if save_file:
        path = library._file(ref.name)
        file_format.save_reference(ref, path)
        logger.info("RefDrop reference '%s' saved to %s", ref.name, path)
    return ref
