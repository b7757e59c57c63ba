"""RefDrop mode Batch (consistent batch): the images of one batch share self-attention tokens.

`BatchRunner` has the `Runner` interface the attention sites drive (`on_eval`, `attend`): the UNet attn1 replace
(`forge_refdrop._install_attn1`, (B, N, C) tensors) and, on Flux and Chroma, the joint attention of every double/single
block (`forge_dit`, roped (B, heads, tokens, head_dim) tensors whose `joint.image` tokens are the image: only the image
tokens are shared and only the image-token outputs are blended, text tokens keep their own attention). Each chunk of the
model call whose branch is selected (cond; uncond too with "Uncond branch too") is one group: its rows share tokens with
each other only. The maths is `refdrop.batch`; this module picks the groups, the seeds and the first batch's pool.
"""

from __future__ import annotations

from typing import Any

import torch

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host import samplers
from lib_imgcond.memory import arena
from lib_imgcond.refdrop import batch as cb
from lib_imgcond.refdrop import layers as rd

MODE = "Batch"


def pool_mode(values: dict) -> bool:
    return values.get("batch_sets") == cb.SETS[1]


def estimate(p: Any, family: str, layers, hires: bool, rate: float, branches: int, dtype_bytes: int) -> int:
    """Host bytes the first batch's pool takes (batch_sets = first batch is the reference)."""
    batch = int(p.batch_size)
    width, height = int(p.width), int(p.height)
    evals = samplers.evaluations(samplers.pass_sampler_name(p, hires=False), int(p.steps))
    needed = cb.pool_bytes([rd.layer_shape(family, x, width, height) for x in layers], evals, batch, rate, branches,
                           dtype_bytes)  # fmt: skip
    if hires:
        sw = int(getattr(p, "hr_upscale_to_x", 0) or width * 2)
        sh = int(getattr(p, "hr_upscale_to_y", 0) or height * 2)
        hr_steps = int(getattr(p, "hr_second_pass_steps", 0) or p.steps)
        hr = samplers.evaluations(samplers.pass_sampler_name(p, hires=True), hr_steps)
        shapes = [rd.layer_shape(family, x, sw, sh) for x in layers]
        needed += cb.pool_bytes(shapes, hr, batch, rate, branches, dtype_bytes)
    return needed


class BatchRunner:
    """Per pass and batch: consistent self-attention inside each selected chunk of every selected layer."""

    def __init__(self, job: Any, tracker: Any):
        self.job, self.tracker = job, tracker
        values = job.values
        self.c, self.rate = float(values["coefficient"]), float(values["rate"])
        self.start, self.end = values["start"], values["end"]
        self.branches = (0, 1) if values["uncond"] else (0,)
        pooling = pool_mode(values)
        self.keep = pooling and job.iteration == 0  # the first batch fills job.pool
        self.read = pooling and job.iteration > 0  # later batches attend to it
        self.active = False

    def flush(self) -> None:  # the Runner interface (nothing is pending here)
        pass

    def on_eval(self, sigma: float) -> None:
        tracker = self.tracker
        tracker.on_eval(sigma)
        self.active = self.c != 0 and rd.step_in_window(tracker.step, tracker.n_steps, self.start, self.end)

    def attend(self, key, q, k, v, chunks, plain, attn, fusable: bool = False, joint=None):
        if not self.active or key not in self.job.layers:
            return plain()
        b = q.shape[0] // len(chunks)
        groups = [j for j, branch in enumerate(chunks) if branch in self.branches]
        if not groups:
            return plain()
        base = plain()
        job, tracker = self.job, self.tracker
        for j in groups:
            branch = chunks[j]
            rows = slice(j * b, (j + 1) * b)
            site = (tracker.pass_name, tracker.eval, *key, branch, chunks[:j].count(branch))
            seed = cb.derive_seed(job.batch_seed, *site)
            kr, vr = k[rows], v[rows]
            # a DiT's call also holds the text tokens: only image tokens are shared, only their outputs blended
            ki, vi = (kr[:, :, joint.image], vr[:, :, joint.image]) if joint is not None else (kr, vr)
            shared = None
            if self.read:
                kept = job.pool.get(site)
                if kept is not None:
                    shared = tuple(t.to(device=k.device, dtype=k.dtype, non_blocking=True) for t in kept)
            if shared is None:
                shared = cb.others_shared(ki, vi, self.rate, seed)
            if self.keep:
                self._keep(site, ki, vi, seed)
            if shared[0].shape[-2] == 0:
                continue
            out = attn(q[rows], *cb.joint(kr, vr, shared), rows)
            tokens = joint.image if joint is not None else slice(None)
            cb.blend(base[rows, tokens], out[:, tokens], self.c)
        return base

    def _keep(self, site: tuple, k: torch.Tensor, v: torch.Tensor, seed: int) -> None:
        job = self.job
        kept = tuple(t.to("cpu", copy=True) for t in cb.pooled(k, v, self.rate, cb.derive_seed(seed, "pool")))
        job.pool[site] = kept
        job.pool_bytes += sum(t.numel() * t.element_size() for t in kept)
        if job.budget and job.pool_bytes > job.budget:
            raise ImgcondError(
                f"RefDrop consistent batch: the first batch's kept tokens passed the RAM budget "
                f"({arena.format_bytes(job.budget)}); raise it in Settings → ImgCond, lower the rate or select fewer "
                "layers"
            )
