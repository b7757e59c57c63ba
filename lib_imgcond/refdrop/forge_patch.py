"""RefDrop's patch machinery, written once for every attention site (UNet attn1, Flux double/single blocks).

A site adapter (``forge_install.install`` for UNets, ``forge_dit.install`` for Flux) turns each attention call into
``Runner.attend(key, q, k, v, chunks, plain, attn, ...)``: batch-first tensors with tokens in dim −2, the host's own
result as ``plain()`` and the kernel for reference branches as ``attn(q, k, v, rows)``. The runner records, plans
each evaluation once, fetches reference K/V and blends; on a DiT (``joint``) the reference branch attends the
current text tokens plus the reference's image tokens, and only image-token outputs are blended.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, NamedTuple

import torch

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host import progress
from lib_imgcond.memory import arena
from lib_imgcond.refdrop import joint as joint_kv
from lib_imgcond.refdrop import layers as rd
from lib_imgcond.refdrop import reference
from lib_imgcond.refdrop.source import ReferenceSource

FLUSH_EVERY = 24  # recorded layers gathered per device→host copy (bounds the device memory they hold)
# On CUDA, layers with fewer query tokens than this run plain and reference attention as one kernel call (they are
# launch-bound: one call is cheaper); larger ones attend the reference rows separately, which copies no q/k/v
FUSE_BELOW_TOKENS = 2048


class PassTracker:
    """Which model evaluation of the pass is running, and the sampler's progress through its schedule."""

    def __init__(self, pass_name: str, fallback_steps: int):
        self.pass_name = pass_name
        self.fallback_steps = max(1, fallback_steps)
        self.schedule: list[float] | None = None
        self.first: int | None = None
        self.eval = -1
        self.step = 0
        self.trace: list[float] = []

    @property
    def n_steps(self) -> int:
        if self.schedule is None or self.first is None:
            return self.fallback_steps
        return max(1, len(self.schedule) - 1 - self.first)

    def on_eval(self, sigma: float) -> None:
        self.eval += 1
        idx = _nearest(self.schedule, sigma) if self.schedule else None
        if idx is None and self.schedule is None:
            idx = self.eval if self.first is None else self.first + self.eval
        if idx is not None:
            if self.first is None:
                self.first = idx
            self.step = max(0, idx - self.first)
        self.trace.append(self.step / self.n_steps)

    @property
    def progress(self) -> float:
        return self.trace[-1] if self.trace else 0.0

    @property
    def complete(self) -> bool:
        """Whether the pass got as far as its last step (an interrupted pass stops short of it)."""
        if self.eval < 0:
            return False
        if self.schedule is None or self.first is None:
            return self.eval + 1 >= self.fallback_steps
        return self.step >= self.n_steps - 1


def refuse_incomplete(name: str, trackers: dict[str, PassTracker], interrupted: bool) -> None:
    """Raise, saying where it stopped, when a recording's job was interrupted or a pass stopped short of its last step
    (a partial reference would blend steps that were never recorded as if they were)."""
    short = [
        f"{pass_name} pass: step {t.step + 1} of {t.n_steps}" for pass_name, t in trackers.items() if not t.complete
    ]
    if interrupted or short:
        where = "; ".join(short) or "the job was interrupted"
        raise ImgcondError(
            f"RefDrop: the recording of '{name}' was interrupted ({where}) and was discarded; nothing was kept "
            "or saved. Record it again."
        )


def _nearest(schedule: list[float], sigma: float) -> int | None:
    for i, s in enumerate(schedule[:-1]):
        if abs(s - sigma) <= 1e-4 * max(abs(s), 1e-8):
            return i
    return None


def _recorded_eval(ref: reference.Reference, pass_name: str, e: int, progress: float) -> int:
    """The recorded evaluation to read for Use evaluation `e`: the same one when the runs line up (same sampler and
    steps), else the one with the nearest normalised progress."""
    trace = ref.meta.get("trace", {}).get(pass_name) or []
    if not trace:
        return rd.map_step(e, max(e + 1, 1), ref.steps(pass_name))
    if e < len(trace) and trace[e] == progress:
        return e
    return min(range(len(trace)), key=lambda j: (abs(trace[j] - progress), j))


class Joint(NamedTuple):
    """A DiT attention call whose image tokens are `start:end` (None: to the end); every other token is context (the
    prompt's text, padding) that the reference branch keeps from the current call. K/V are (B, heads, tokens, d)."""

    start: int
    end: int | None = None

    @property
    def image(self) -> slice:
        return slice(self.start, self.end)


class Runner:
    """Per pass: record K/V, or plan, fetch and blend reference K/V, for every selected attention site."""

    def __init__(self, job: Any, tracker: PassTracker):
        self.job, self.tracker = job, tracker
        values = job.values
        self.item, self.use_uncond = values["batch_item"], values["uncond"]
        self.start, self.end = values["start"], values["end"]
        self.every = job.record_every
        name = tracker.pass_name
        self.branch_names = (name, f"{name}_uncond")
        self.names = self.branch_names if self.use_uncond else self.branch_names[:1]
        order = [tuple(x[:3]) for x in rd.layer_table(job.family) if tuple(x[:3]) in job.layers]  # execution order
        self.source = ReferenceSource(job.uses, order, recording=job.record)
        job.sources.append(self.source)
        self.tasks: list = []  # this evaluation's (reference index, pass name, branch, recorded evaluation, c)
        self.layouts: dict[tuple, list] = {}  # chunk order -> [(reference index, pass name, evaluation, chunks)]
        self.planned: int | None = None
        self.recorded = job.record.nbytes if job.record is not None else 0
        self.pending: list = []  # (key, k row, v row) recorded during this evaluation, still on the device
        self.streams: dict = {}
        if job.record is not None:
            job.flushers.append(self.flush)

    def flush(self) -> None:
        """Store this evaluation's recorded K/V: one gather, then (unless the recording stays in GPU memory) one copy
        to the host, issued on a side stream on CUDA."""
        pending, job = self.pending, self.job
        if not pending:
            return
        device = pending[0][1].device
        side = None
        kept = device == job.record.device  # the recording stays in this GPU's memory: gathered on this stream
        if device.type == "cuda" and not kept:
            side = self.streams.get(device)
            if side is None:
                side = self.streams[device] = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            for _key, k, v in pending:
                k.record_stream(side)  # the rows stay allocated until the side stream has copied them
                v.record_stream(side)
        # the first copy of a recording allocates (on CUDA: pins) its host memory, the slow part of a first recording
        first = self.recorded == 0 and not kept
        shown = progress.status("RefDrop: allocating host memory for the recording") if first else nullcontext()
        with shown, torch.cuda.stream(side) if side is not None else nullcontext():
            self.recorded += job.record.put_many(pending)
        pending.clear()
        if job.budget and self.recorded > job.budget:
            raise ImgcondError(
                f"RefDrop recording passed the RAM budget ({arena.format_bytes(job.budget)}); "
                "raise it in Settings → ImgCond or select fewer layers"
            )

    def on_eval(self, sigma: float) -> None:
        """Once per model evaluation, before it runs."""
        self.flush()
        self.source.live.clear()
        self.tracker.on_eval(sigma)

    def _plan(self, device, dtype) -> None:
        """Once per evaluation: which recorded evaluation each reference contributes, and start moving it."""
        tracker, tasks = self.tracker, self.tasks
        tasks.clear()
        self.layouts.clear()
        self.planned = tracker.eval
        if not rd.step_in_window(tracker.step, tracker.n_steps, self.start, self.end):
            return
        for i, (ref, c) in enumerate(self.job.uses):
            for branch, name in enumerate(self.names):
                if c != 0 and ref.has_pass(name):
                    tasks.append((i, name, branch, _recorded_eval(ref, name, tracker.eval, tracker.progress), c))
        self.source.prepare(tasks, device, dtype)

    def _record(self, k, v, key, chunks, b: int, joint: Joint | None) -> None:
        job = self.job
        capturing, target = job.capturing, job.capture_target
        if target is not None:  # a trajectory's replay: its own branches, at the evaluation it replays
            branches, step, keep = job.capture_branches, job.capture_eval, False
        else:  # Record, or Image mode's reference forward (cond only); both kept on the host
            branches = (0, 1) if self.use_uncond and not capturing else (0,)
            step, keep, target = self.tracker.eval // self.every, True, job.record
        for branch in branches:
            if branch in chunks:
                row = chunks.index(branch) * b + (0 if capturing else self.item)
                full = reference.RefKey(self.branch_names[branch], step, *key)
                kv = (k[row : row + 1], v[row : row + 1])
                if joint is not None:
                    kv = tuple(joint_kv.pack(t[:, :, joint.image]) for t in kv)
                if keep:
                    self.pending.append((full, *kv))
                if capturing:  # the real call reads them straight from the device
                    self.source.live[(id(target), full)] = kv
        if len(self.pending) >= FLUSH_EVERY:
            self.flush()

    def attend(self, key, q, k, v, chunks, plain, attn, fusable: bool = False, joint: Joint | None = None):
        """The site's output: `plain()` where RefDrop does nothing, else the blend (in place on `plain()`'s output
        or, on CUDA when `fusable`, one fused kernel call)."""
        job = self.job
        if key not in job.layers:
            return plain()
        b = q.shape[0] // len(chunks)
        if job.recording:
            if self.tracker.eval % self.every == 0:  # Record every k-th evaluation only (`record_every`)
                self._record(k, v, key, chunks, b, joint)
            return plain()
        if self.planned != self.tracker.eval:
            self._plan(q.device, q.dtype)
        order = tuple(chunks)
        layout = self.layouts.get(order)
        if layout is None:  # once per evaluation and chunk order: which batch chunks each task blends
            layout = [(i, name, e, js) for i, name, branch, e, _c in self.tasks if (js := _chunks_of(order, branch))]
            self.layouts[order] = layout
        plan: dict[int, list] = {}  # reference index -> [(chunk, k_ref, v_ref)]
        get = self.source.get
        for i, name, e, js in layout:
            kr, vr = get(i, name, e, key)
            entries = plan.setdefault(i, [])
            if joint is None:
                entries.extend((j, kr, vr) for j in js)
            else:
                for j in js:
                    rows = slice(j * b, (j + 1) * b)
                    entries.append(
                        (j, *(joint_kv.with_context(t[rows], r, joint.image) for t, r in ((k, kr), (v, vr))))
                    )
        if not plan:
            return plain()
        if joint is not None:  # on CUDA only the image-token queries attend the reference (no fused call)
            return _blend(plain(), q, k, v, b, plan, job.uses, attn, joint.image, joint_queries=True)
        if fusable and q.is_cuda and q.shape[-2] < FUSE_BELOW_TOKENS:
            fused = _fused(q, k, v, b, plan, job.uses, attn)
            if fused is not None:
                return fused
        return _blend(plain(), q, k, v, b, plan, job.uses, attn)


def _chunks_of(chunks, branch: int) -> tuple[int, ...]:
    return tuple(j for j, chunk_branch in enumerate(chunks) if chunk_branch == branch)


def _rows(t: torch.Tensor, b: int) -> torch.Tensor:
    return t if t.shape[0] == b else t.expand(b, *t.shape[1:])


def _fused(q, k, v, b: int, plan: dict, uses: list, attn, tokens: slice = slice(None)):
    """CUDA, same token count: the plain attention and every reference branch in one kernel call (one launch
    sequence instead of two; SDPA is batch invariant there, so the plain rows equal an unpatched call's)."""
    qs, ks, vs, where = [q], [k], [v], []
    for i, entries in plan.items():
        for j, kr, vr in entries:
            if kr.shape[-2] != k.shape[-2]:
                return None
            qs.append(q[j * b : (j + 1) * b])
            ks.append(_rows(kr, b))
            vs.append(_rows(vr, b))
            where.append((j, uses[i][1]))
    out = attn(torch.cat(qs), torch.cat(ks), torch.cat(vs), None)
    n = q.shape[0]
    base = out[:n]
    outs: dict[int, list] = {}
    for idx, (j, c) in enumerate(where):
        outs.setdefault(j, []).append((out[n + idx * b : n + (idx + 1) * b, tokens], c))
    _apply(base, b, outs, tokens)
    return base


def _apply(base, b: int, outs: dict, tokens: slice = slice(None)) -> None:
    """base[chunk rows, tokens] ← blend with that chunk's reference outputs (given for those tokens), in place."""
    for j, pairs in outs.items():
        rows = base[j * b : (j + 1) * b, tokens]
        if len(pairs) == 1:
            ref_out, c = pairs[0]
            rows.lerp_(ref_out if ref_out.dtype == rows.dtype else ref_out.to(rows.dtype), float(c))
        else:
            rows.copy_(rd.blend_outputs(rows, pairs))


def _blend(
    base, q, k, v, b: int, plan: dict, uses: list, attn, tokens: slice = slice(None), joint_queries: bool = False
):
    """RFG-blend the planned batch chunks of `base` in place (output `tokens` only).

    On the CPU, where the hosts' attention kernels are not batch-size invariant for every shape, a reference with the
    current token count is attended over the whole batch (reference K/V in the planned chunks' rows), the same call
    shape as `base`: a reference equal to the current K/V then gives back `base` bit for bit. On CUDA (SDPA kernels
    are batch invariant, see benchmarks/attention_batch_invariance.py) and for other token counts only the planned
    rows are attended, which is cheaper; with `joint_queries` (a DiT's (B, heads, tokens, head_dim) q) only the
    queries of the blended tokens."""
    outs: dict[int, list] = {}  # chunk -> [(reference output of `tokens`, c)]
    for i, entries in plan.items():
        c = uses[i][1]
        if not q.is_cuda and all(kr.shape[-2] == k.shape[-2] for _, kr, _ in entries):
            ks, vs = list(k.split(b)), list(v.split(b))
            for j, kr, vr in entries:
                ks[j], vs[j] = _rows(kr, b), _rows(vr, b)
            ref_out = attn(q, torch.cat(ks), torch.cat(vs), None)
            for j, _, _ in entries:
                outs.setdefault(j, []).append((ref_out[j * b : (j + 1) * b, tokens], c))
        else:
            for j, kr, vr in entries:
                rows = slice(j * b, (j + 1) * b)
                qr = q[rows][:, :, tokens] if joint_queries else q[rows]
                out = attn(qr, _rows(kr, b), _rows(vr, b), rows)
                outs.setdefault(j, []).append((out if joint_queries else out[:, tokens], c))
    _apply(base, b, outs, tokens)
    return base
