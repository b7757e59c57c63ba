"""RefDrop on Forge: the patches on the pass's UnetPatcher clone (`p.sd_model.forge_objects.unet`).

One attn1 replace (for every transformer block; on Flux the per-call attention of its blocks, `forge_dit`) and one
conditioning modifier (once per model evaluation, to know the evaluation index and the sampler's progress). The
patch functions are closures over the job (:class:`lib_imgcond.refdrop.forge_refdrop.Job`), so `UnetPatcher.clone()`
never copies the K/V stores.
"""

from __future__ import annotations

from typing import Any

import torch

from lib_imgcond.host import forge
from lib_imgcond.host.sites import registry as sites
from lib_imgcond.refdrop import forge_consistent as consistent
from lib_imgcond.refdrop import forge_replay as replay
from lib_imgcond.refdrop.families import DIT, dit_shape
from lib_imgcond.refdrop.forge_patch import PassTracker, Runner
from lib_imgcond.refdrop.forge_refdrop import Job


# --- the patches ----------------------------------------------------------------------------------------------------
def install(unet: Any, job: Job, tracker: PassTracker, attn) -> None:
    """Install RefDrop on `unet` by the model's attention sites: an attn1 replace (every UNet transformer block), or
    on Flux the per-call attention of its double/single blocks (`forge_dit`); plus the per-evaluation bookkeeping."""
    runner = consistent.BatchRunner(job, tracker) if job.values["mode"] == consistent.MODE else Runner(job, tracker)

    def on_eval(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        runner.on_eval(float(timestep.flatten()[0]))
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    unet.add_conditioning_modifier(on_eval)
    if job.trajectory is not None:  # nothing blends: only the model calls' inputs are kept
        replay.install_record(unet, job, tracker)
        return
    if job.image_latent is not None:
        # filled live: Use reads the evaluation just captured
        job.record.meta["trace"][tracker.pass_name] = tracker.trace
        install_image_capture(unet, job, tracker, runner.flush)
    if any(getattr(ref, "replayed", False) for ref, _c in job.uses):  # its replay runs before Image mode's capture
        replay.install_replay(unet, job, tracker)
    dit = dit_shape(job.family)
    if dit is not None:  # after the capture wrapper: its reference call runs inside ours
        from lib_imgcond.refdrop import forge_dit as refdrop_dit

        site = sites.site(dit[0])
        if site is None:
            refdrop_dit.install(unet, runner)
        else:
            refdrop_dit.install_site(unet, runner, site, DIT[dit[0]].groups)
    else:
        _install_attn1(unet, runner, attn)


def _install_attn1(unet: Any, runner: Runner, attn) -> None:
    """UNet: one attn1 replace for every transformer block, chained to another extension's replace."""
    inner_replaces = dict(unet.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {}))
    inners: dict[tuple, Any] = {}

    def attn1(q, k, v, extra_options):
        key = (extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])
        if key not in inners:
            inners[key] = forge.resolve_replace(inner_replaces, key)
        inner = inners[key]
        heads = extra_options["n_heads"]

        def plain():
            return inner(q, k, v, extra_options) if inner else attn(q, k, v, heads)

        def kernel(qx, kx, vx, _rows):
            return attn(qx, kx, vx, heads)

        chunks = extra_options.get("cond_or_uncond") or [0]
        return runner.attend(key, q, k, v, chunks, plain, kernel, fusable=inner is None)

    forge.mark_ours(attn1, inner=inner_replaces)
    unet.set_model_replace_all(attn1, "attn1")


def _slice_c(c: dict, row: int, batch: int) -> dict:
    """The model-call kwargs for one row of the batch, as a lone cond call (no ControlNet on the reference)."""
    out = {}
    for key, value in c.items():
        if key in ("control", "control_model"):
            continue
        if key == "transformer_options":
            to = dict(value)
            to.update(cond_or_uncond=[0], cond_indices=[0], uncond_indices=[])
            for name in ("sigmas", "cond_mark"):
                if isinstance(to.get(name), torch.Tensor) and to[name].shape[:1] == (batch,):
                    to[name] = to[name][row : row + 1]
            out[key] = to
        elif isinstance(value, torch.Tensor) and value.shape[:1] == (batch,):
            out[key] = value[row : row + 1]
        else:
            out[key] = value
    return out


def install_image_capture(unet: Any, job: Job, tracker: PassTracker, flush) -> None:
    """Mode Image: before the model call of each evaluation, run the UNet once on the reference image noised to the
    current sigma (fixed noise), recording its K/V; the real call then blends them in."""
    inner = unet.model_options.get("model_function_wrapper")
    predictor = unet.model.predictor
    noise_cache: dict[tuple, torch.Tensor] = {}

    def wrapper(apply_model, args):
        x, t, c, chunks = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
        marker = (tracker.pass_name, tracker.eval)
        if 0 in chunks and job.captured_eval != marker:
            job.captured_eval = marker
            b = x.shape[0] // len(chunks)
            row = chunks.index(0) * b
            z = job.image_latent.to(device=x.device, dtype=x.dtype)
            if z.ndim == 5 and x.ndim == 5 and z.shape[2] != x.shape[2]:  # a video clip: the image as a still clip
                z = z[:, :, :1].expand(-1, -1, x.shape[2], -1, -1)  # (the model may concat per-frame inputs to it)
            key = (tuple(z.shape), str(x.device), x.dtype)
            if key not in noise_cache:
                gen = torch.Generator().manual_seed(job.image_seed)
                noise_cache[key] = torch.randn(z.shape, generator=gen).to(device=x.device, dtype=x.dtype)
            sigma = t[row : row + 1]
            x_ref = predictor.noise_scaling(sigma.view(-1, 1, 1, 1), noise_cache[key], z)
            job.capturing = True
            try:
                apply_model(x_ref, sigma, **_slice_c(c, row, x.shape[0]))
            finally:
                job.capturing = False
            flush()  # keep it for later plain Use; this evaluation reads the device copies
        if inner is not None:
            return inner(apply_model, args)
        return apply_model(x, t, **c)

    unet.set_model_unet_function_wrapper(wrapper)


def capture_schedule(p: Any, tracker: PassTracker) -> None:
    """Wrap this job's sampler's get_sigmas (an instance attribute, gone with the sampler) to learn its schedule."""
    sampler = getattr(p, "sampler", None)
    if sampler is None or not hasattr(sampler, "get_sigmas"):
        return
    original = getattr(sampler.get_sigmas, "_imgcond_orig", sampler.get_sigmas)

    def get_sigmas(*args, **kwargs):
        sigmas = original(*args, **kwargs)
        tracker.schedule = [float(s) for s in torch.as_tensor(sigmas).flatten().tolist()]
        return sigmas

    get_sigmas._imgcond_orig = original
    sampler.get_sigmas = get_sigmas
