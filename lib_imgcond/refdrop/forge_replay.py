"""RefDrop trajectory references on Forge (UNet families): record the model calls' inputs, replay them at Use.

Record wraps the model function of the pass's UnetPatcher clone and keeps, per model call, the recorded batch item's
rows (latent, sigma, conditioning) and the call's chunk order. Use wraps it too: before the first model call of each
evaluation in the step window, every trajectory reference replays its progress-nearest evaluation through the same
model, *with the composition it was recorded with* (cond and uncond rows in one call when they were): the CPU
kernels are not batch-size invariant, and only the same call shape gives the recorded item's K/V bit for bit. The
attn1 patch records the replay's K/V into the pass's live table (as Image mode does) and the real call blends them.
"""

from __future__ import annotations

from typing import Any

import torch

from lib_imgcond.common.log import logger
from lib_imgcond.memory.arena import format_bytes, trim_host_memory
from lib_imgcond.refdrop import forge_library as library
from lib_imgcond.refdrop import layers as rd
from lib_imgcond.refdrop import trajectory as traj
from lib_imgcond.refdrop.forge_patch import PassTracker, _recorded_eval, refuse_incomplete

SKIP = ("control", "control_model", "transformer_options")  # not replayed (no ControlNet on the reference)


def _conditioning(c: dict, row: int, batch: int) -> dict[str, torch.Tensor]:
    """The batch-sized tensors of a model call's kwargs, sliced to one row."""
    out = {}
    for key, value in c.items():
        if key not in SKIP and isinstance(value, torch.Tensor) and value.shape[:1] == (batch,):
            out[key] = value[row : row + 1]
    return out


def install_record(unet: Any, job: Any, tracker: PassTracker) -> None:
    """Record mode, trajectory storage: keep each model call's inputs for the recorded batch item."""
    inner = unet.model_options.get("model_function_wrapper")
    item = job.values["batch_item"]

    def wrapper(apply_model, args):
        x, t, c, chunks = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
        b = x.shape[0] // len(chunks)
        rows = [j * b + item for j in range(len(chunks))]
        slots = [
            (branch, x[r : r + 1], _conditioning(c, r, x.shape[0])) for branch, r in zip(chunks, rows, strict=True)
        ]
        job.trajectory.add_call(tracker.pass_name, tracker.eval, slots, t[rows[0]])
        if inner is not None:
            return inner(apply_model, args)
        return apply_model(x, t, **c)

    unet.set_model_unet_function_wrapper(wrapper)


def _options(to: dict, branches: list[int], sigma: torch.Tensor) -> dict:
    out = dict(to)
    out.update(
        cond_or_uncond=list(branches),
        cond_indices=[j for j, b in enumerate(branches) if b == 0],
        uncond_indices=[j for j, b in enumerate(branches) if b == 1],
        sigmas=sigma,
    )
    out.pop("cond_mark", None)
    return out


def install_replay(unet: Any, job: Any, tracker: PassTracker) -> None:
    """Use: before each evaluation's first model call, replay every trajectory reference's nearest evaluation."""
    inner = unet.model_options.get("model_function_wrapper")
    refs = [(ref, c) for ref, c in job.uses if getattr(ref, "replayed", False) and c != 0]
    values = job.values
    done: list = [None]
    cache: dict[tuple, tuple] = {}  # (reference, evaluation, device, dtype) -> the moved calls (the last one only)

    def replay(apply_model, x, c) -> None:
        to = c.get("transformer_options", {})
        extra = {k: v for k, v in c.items() if k not in SKIP and not isinstance(v, torch.Tensor)}
        for ref, _c in refs:
            name = tracker.pass_name
            if not ref.has_pass(name):
                continue
            e = _recorded_eval(ref, name, tracker.eval, tracker.progress)
            key = (id(ref), name, e, x.device, x.dtype)
            if key not in cache:
                cache.clear()
                cache[key] = [
                    (b, xr.to(x.device), sr.to(x.device), {k: v.to(x.device) for k, v in cond.items()})
                    for b, xr, sr, cond in ref.calls(name, e)
                ]
            job.capture_target, job.capture_branches, job.capture_eval = ref, ref.branches(name), e
            job.capturing = True
            try:
                for branches, xr, sr, cond in cache[key]:
                    apply_model(xr, sr, **extra, **cond, transformer_options=_options(to, branches, sr))
            finally:
                job.capturing, job.capture_target = False, None

    def wrapper(apply_model, args):
        x, t, c = args["input"], args["timestep"], args["c"]
        marker = (tracker.pass_name, tracker.eval)
        if done[0] != marker:
            done[0] = marker
            if rd.step_in_window(tracker.step, tracker.n_steps, values["start"], values["end"]):
                replay(apply_model, x, c)
        if inner is not None:
            return inner(apply_model, args)
        return apply_model(x, t, **c)

    unet.set_model_unet_function_wrapper(wrapper)


def finish(job: Any, trackers: dict[str, PassTracker], save_file: bool, interrupted: bool) -> Any:
    """Keep the trajectory as a reference (and save it), or discard an interrupted one, saying so."""
    ref, job.trajectory = job.trajectory, None  # kept again below only when the trajectory is whole
    refuse_incomplete(ref.name, trackers, interrupted)
    job.trajectory = ref
    steps = {name: t.n_steps for name, t in trackers.items()}
    ref.finalize(steps, {name: t.trace for name, t in trackers.items()}, uncond=bool(job.values.get("uncond")))
    with library._LOCK:
        replaced = library.REFERENCES.pop(ref.name, None)
        library.REFERENCES[ref.name] = ref
    if replaced is not None:
        del replaced
        trim_host_memory()
    logger.info("RefDrop trajectory '%s' recorded: %d evaluations, %s", ref.name, len(ref), _size(ref))
    if save_file:
        path = library._file(ref.name)
        traj.save(ref, path)
        logger.info("RefDrop trajectory '%s' saved to %s", ref.name, path)
    return ref


def _size(ref: Any) -> str:
    return format_bytes(ref.nbytes)
