"""RefDrop on Forge: record self-attention K/V into named references and blend attention over them.

One attn1 replace (for every transformer block) and one conditioning modifier (once per model evaluation, to know the
evaluation index and the sampler's progress) are installed on the pass's UnetPatcher clone. The patch functions are
closures over per-job state, so `UnetPatcher.clone()` never copies the K/V stores.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from lib_imgcond.core import refdrop as rd
from lib_imgcond.core import refdrop_store as store
from lib_imgcond.core.errors import ArgumentError, ImgcondError
from lib_imgcond.hosts import forge
from lib_imgcond.hosts import forge_samplers as samplers
from lib_imgcond.hosts import refdrop_library as library
from lib_imgcond.hosts.refdrop_library import (  # noqa: F401  (re-exported: the script uses them from here)
    REFERENCES,
    all_names,
    check_name,
    delete,
    describe,
    lookup,
    save,
)
from lib_imgcond.log import logger

MODES = ("Record", "Use", "Image")
FLUSH_EVERY = 24  # recorded layers gathered per device→host copy (bounds the device memory they hold)


def release(job: Job) -> None:
    """After a job: drop its hold on reference tensors. Its patched UnetPatcher clone stays on the model until the
    next generation, and the patch closures reach the job, so without this a deleted or replaced reference would
    stay in memory until then."""
    job.uses.clear()  # the passes' reference sources share this list
    for source in job.sources:
        source.release()
    job.sources.clear()
    job.record, job.image_latent = None, None
    job.flushers.clear()
    store.trim_host_memory()


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
    uses: list[tuple[store.Reference, float]] = field(default_factory=list)
    record: store.Reference | None = None
    budget: int = 0
    image_latent: torch.Tensor | None = None  # mode Image: the VAE-encoded reference image (1, C, h, w)
    image_seed: int = 0
    capturing: bool = False
    captured_eval: tuple = ()
    flushers: list = field(default_factory=list)  # per pass: move the last evaluation's recorded K/V to the host
    sources: list = field(default_factory=list)  # per pass: its _ReferenceSource (released after the job)

    @property
    def recording(self) -> bool:
        """True while K/V must be stored: the whole pass in Record mode, the reference forward in Image mode."""
        return self.record is not None and (self.values["mode"] == "Record" or self.capturing)


def plan(p: Any, values: dict, budget_bytes: int, store_fp16: bool) -> Job:
    """Validate everything a job needs before any sampling; raise a clear ImgcondError otherwise."""
    family = forge.require_family(p.sd_model, ("sd15", "sdxl"), "RefDrop")
    layers = frozenset(tuple(x[:3]) for x in rd.parse_layers(values["layers"], family))
    if not layers:
        raise ArgumentError("refdrop.layers", values["layers"], "at least one layer")
    batch = int(getattr(p, "batch_size", 1))
    if values["batch_item"] >= batch:
        raise ArgumentError("refdrop.batch_item", values["batch_item"], f"an index below the batch size {batch}")
    name = check_name(values["reference"])
    job = Job(values, family, layers, budget=budget_bytes)
    hires = bool(getattr(p, "enable_hr", False)) and values["hires"]
    if values["mode"] in ("Record", "Image"):
        rows = 2 if values["uncond"] and values["mode"] == "Record" else 1
        store.check_budget(_estimate(p, family, layers, hires, rows, 2 if store_fp16 else 4), budget_bytes)
    if values["mode"] == "Record":
        meta = {"width": int(p.width), "height": int(p.height), "source": "generation", "trace": {}, "sampler": {}}
        job.record = store.Reference(name, family, meta, store_fp16=store_fp16)
        return job
    more = parse_more(values["more_references"])
    if values["mode"] == "Image":
        if values["image"] is None:
            raise ArgumentError("refdrop.image", None, "an image: mode Image takes its reference from it")
        meta = {"width": int(p.width), "height": int(p.height), "source": "image", "trace": {}}
        job.record = store.Reference(name, family, meta, store_fp16=False)
        job.uses.append((job.record, values["coefficient"]))
        job.image_seed = int(getattr(p, "seed", 0) or 0)
    else:
        more.insert(0, (name, values["coefficient"]))
    passes = {"first"} | ({"hires"} if hires else set())
    for ref_name, c in more:
        ref = lookup(ref_name)
        store.check_compatible(ref, family, set(layers), passes)
        job.uses.append((ref, c))
    return job


def _estimate(p: Any, family: str, layers: frozenset, hires: bool, rows: int, dtype_bytes: int) -> int:
    """Bytes a recording will take: one K/V set per model evaluation, counted as the host counts them (its
    sampler configuration: twice per step for the samplers it marks second order). The recording itself counts
    its real evaluations and stops at the budget, so a sampler the host says nothing about is not refused early."""
    width, height = int(p.width), int(p.height)
    steps = samplers.evaluations(samplers.pass_sampler_name(p, hires=False), int(p.steps))
    needed = store.estimate_bytes([rd.layer_shape(family, x, width, height) for x in layers], steps, rows, dtype_bytes)
    if hires:
        sw = int(getattr(p, "hr_upscale_to_x", 0) or width * 2)
        sh = int(getattr(p, "hr_upscale_to_y", 0) or height * 2)
        hr_steps = int(getattr(p, "hr_second_pass_steps", 0) or p.steps)
        hr_steps = samplers.evaluations(samplers.pass_sampler_name(p, hires=True), hr_steps)
        shapes = [rd.layer_shape(family, x, sw, sh) for x in layers]
        needed += store.estimate_bytes(shapes, hr_steps, rows, dtype_bytes)
    return needed


def encode_image(p: Any, image: Any) -> torch.Tensor:
    """VAE-encode a PIL image at the generation's size: (1, C, h, w) latent."""
    import numpy as np
    from modules import sd_samplers_common

    img = image.convert("RGB").resize((int(p.width), int(p.height)))
    t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        return sd_samplers_common.images_tensor_to_samples(t, model=p.sd_model).detach()


# --- the patches ----------------------------------------------------------------------------------------------------
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


def _nearest(schedule: list[float], sigma: float) -> int | None:
    for i, s in enumerate(schedule[:-1]):
        if abs(s - sigma) <= 1e-4 * max(abs(s), 1e-8):
            return i
    return None


def _recorded_eval(ref: store.Reference, pass_name: str, e: int, progress: float) -> int:
    """The recorded evaluation to read for Use evaluation `e`: the same one when the runs line up (same sampler and
    steps), else the one with the nearest normalised progress."""
    trace = ref.meta.get("trace", {}).get(pass_name) or []
    if not trace:
        return rd.map_step(e, max(e + 1, 1), ref.steps(pass_name))
    if e < len(trace) and trace[e] == progress:
        return e
    return min(range(len(trace)), key=lambda j: (abs(trace[j] - progress), j))


def install(unet: Any, job: Job, tracker: PassTracker, attn) -> None:
    """Install RefDrop's attn1 replace (every transformer block) and its per-evaluation bookkeeping on `unet`."""
    values = job.values
    pass_name = tracker.pass_name
    layers = job.layers
    item = values["batch_item"]
    use_uncond = values["uncond"]
    inner_replaces = dict(unet.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {}))
    inners: dict[tuple, Any] = {}
    start, end = values["start"], values["end"]
    names = (pass_name, f"{pass_name}_uncond") if use_uncond else (pass_name,)
    order = [tuple(x[:3]) for x in rd.layer_table(job.family) if tuple(x[:3]) in layers]  # execution order
    source = _ReferenceSource(job.uses, order, recording=job.record)
    job.sources.append(source)
    tasks: list = []  # this evaluation's (reference index, pass name, branch, recorded evaluation, c)
    state = {"planned": None, "recorded": job.record.nbytes if job.record is not None else 0}
    pending: list = []  # (key, k row, v row) recorded during this evaluation, still on the device
    streams: dict = {}

    def flush():
        """Move this evaluation's recorded K/V to the host: one gather and one copy, on a side stream on CUDA."""
        if not pending:
            return
        device = pending[0][1].device
        side = None
        if device.type == "cuda":
            side = streams.get(device)
            if side is None:
                side = streams[device] = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            for _key, k, v in pending:
                k.record_stream(side)  # the rows stay allocated until the side stream has copied them
                v.record_stream(side)
        with torch.cuda.stream(side) if side is not None else nullcontext():
            state["recorded"] += job.record.put_many(pending)
        pending.clear()
        if job.budget and state["recorded"] > job.budget:
            raise ImgcondError(
                f"RefDrop recording passed the RAM budget ({store.format_bytes(job.budget)}); "
                "raise it in Settings → ImgCond or select fewer layers"
            )

    if job.record is not None:
        job.flushers.append(flush)

    def on_eval(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        flush()
        source.live.clear()
        tracker.on_eval(float(timestep.flatten()[0]))
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    def plan_eval(device, dtype):
        """Once per evaluation: which recorded evaluation each reference contributes, and start moving it."""
        tasks.clear()
        state["planned"] = tracker.eval
        if not rd.step_in_window(tracker.step, tracker.n_steps, start, end):
            return
        for i, (ref, c) in enumerate(job.uses):
            for branch, name in enumerate(names):
                if c != 0 and ref.has_pass(name):
                    tasks.append((i, name, branch, _recorded_eval(ref, name, tracker.eval, tracker.progress), c))
        source.prepare(tasks, device, dtype)

    def record(k, v, key, chunks, b):
        for branch in (0, 1) if use_uncond and not job.capturing else (0,):
            if branch in chunks:
                row = chunks.index(branch) * b + (0 if job.capturing else item)
                name = pass_name if branch == 0 else f"{pass_name}_uncond"
                full = store.RefKey(name, tracker.eval, *key)
                kv = (k[row : row + 1], v[row : row + 1])
                pending.append((full, *kv))
                if job.capturing:
                    source.live[full] = kv  # Image mode: the real call reads them straight from the device
        if len(pending) >= FLUSH_EVERY:
            flush()

    def attn1(q, k, v, extra_options):
        key = (extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])
        if key not in inners:
            inners[key] = forge.resolve_replace(inner_replaces, key)
        inner = inners[key]
        heads = extra_options["n_heads"]
        if key not in layers:
            return inner(q, k, v, extra_options) if inner else attn(q, k, v, heads)
        chunks = extra_options.get("cond_or_uncond") or [0]
        b = q.shape[0] // len(chunks)
        if job.recording:
            record(k, v, key, chunks, b)
            return inner(q, k, v, extra_options) if inner else attn(q, k, v, heads)
        if state["planned"] != tracker.eval:
            plan_eval(q.device, q.dtype)
        plan: dict[int, list] = {}  # reference index -> [(chunk, k_ref, v_ref)]
        for i, name, branch, e, _c in tasks:
            kr, vr = source.get(i, name, e, key)
            for j, chunk_branch in enumerate(chunks):
                if chunk_branch == branch:
                    plan.setdefault(i, []).append((j, kr, vr))
        if not plan:
            return inner(q, k, v, extra_options) if inner else attn(q, k, v, heads)
        if inner is None and q.is_cuda:
            fused = _fused(q, k, v, b, plan, job.uses, attn, heads)
            if fused is not None:
                return fused
        base = inner(q, k, v, extra_options) if inner else attn(q, k, v, heads)
        return _blend(base, q, k, v, b, plan, job.uses, attn, heads)

    forge.mark_ours(attn1, inner=inner_replaces)
    unet.set_model_replace_all(attn1, "attn1")
    unet.add_conditioning_modifier(on_eval)
    if job.image_latent is not None:
        job.record.meta["trace"][pass_name] = tracker.trace  # filled live: Use reads the evaluation just captured
        install_image_capture(unet, job, tracker, flush)


class _ReferenceSource:
    """Reference K/V on the sampling device, for one pass.

    On CUDA a reference whose K/V for the pass fit comfortably in free VRAM (at most 40 %) is uploaded once, on a side
    stream, each evaluation's tensors behind their own event; others are prefetched one evaluation ahead of use. On
    the CPU the stored tensors are used as they are (cast once per evaluation if the dtype differs)."""

    RESIDENT_SHARE = 0.4

    def __init__(self, uses: list, order: list, recording: store.Reference | None = None):
        self.uses, self.order = uses, order
        self.recording = recording  # Image mode: the reference being captured in this very pass
        self.live: dict = {}  # RefKey -> device (k, v) captured for the current evaluation
        self.resident: dict[tuple, dict] = {}  # (i, name) -> {(e, layer): (k, v)}
        self.events: dict[tuple, Any] = {}  # (i, name, e) -> upload event still to wait for
        self.prefetchers: dict[int, store.Prefetcher] = {}
        self.current: dict[tuple, tuple] = {}  # (i, name, e, layer) -> (k, v), this evaluation (CPU and fallbacks)
        self.stream = None
        self.device, self.dtype = None, None

    def release(self) -> None:
        self.recording = None
        for table in (self.live, self.resident, self.events, self.prefetchers, self.current):
            table.clear()

    def prepare(self, tasks: list, device, dtype) -> None:
        self.current.clear()
        self.device, self.dtype = device, dtype
        if device.type != "cuda":
            return
        for i, name, _branch, e, _c in tasks:
            ref = self.uses[i][0]
            if ref is self.recording:
                continue  # read from `live`
            if (i, name) not in self.resident and not self._upload(i, ref, name, device, dtype):
                self.resident[(i, name)] = None  # too large: prefetch per evaluation instead
            if self.resident.get((i, name)) is None:
                pf = self.prefetchers.get(i)
                if pf is None:
                    pf = self.prefetchers[i] = store.Prefetcher(ref, device, dtype)
                pf.fetch([(name, e, *layer) for layer in self.order])

    def _upload(self, i: int, ref, name: str, device, dtype) -> bool:
        """Copy a reference pass to the GPU storage by storage (a few large pinned slabs, not thousands of tensors),
        then take views; each evaluation waits only for the slabs that hold its K/V."""
        wanted = set(self.order)
        keys = sorted((key for key in ref if key.pass_name == name and key.layer in wanted), key=lambda x: x.step)
        need = sum(2 * ref.get(key)[0].numel() for key in keys) * torch.empty(0, dtype=dtype).element_size()
        free, _total = torch.cuda.mem_get_info(device)
        if need > free * self.RESIDENT_SHARE:
            return False
        self.stream = self.stream or torch.cuda.Stream(device=device)
        storages: dict[int, tuple] = {}  # data_ptr -> (storage, upload order)
        layout = []
        for key in keys:
            for t in ref.get(key):
                st = t.untyped_storage()
                if st.data_ptr() not in storages:
                    storages[st.data_ptr()] = (st, len(storages))
                layout.append((key, st.data_ptr(), t.storage_offset() * t.element_size(), t.shape, t.dtype))
        self.stream.wait_stream(torch.cuda.current_stream(device))
        uploaded, events = {}, []
        with torch.cuda.stream(self.stream):
            for ptr, (st, _order) in storages.items():
                host = torch.empty(0, dtype=torch.uint8).set_(st)
                uploaded[ptr] = host.to(device, non_blocking=host.is_pinned())
                event = torch.cuda.Event()
                event.record(self.stream)
                events.append(event)
            table: dict = {}
            last_slab: dict[int, int] = {}
            for key, ptr, offset, shape, t_dtype in layout:
                n = t_dtype.itemsize * math.prod(shape)
                t = uploaded[ptr][offset : offset + n].view(t_dtype).view(shape)
                if t.dtype != dtype:
                    t = t.to(dtype)
                table.setdefault((key.step, key.layer), []).append(t)
                last_slab[key.step] = max(last_slab.get(key.step, 0), storages[ptr][1])
        self.resident[(i, name)] = {k: tuple(v) for k, v in table.items()}
        for e, slab in last_slab.items():
            self.events[(i, name, e)] = events[slab]
        return True

    def get(self, i: int, name: str, e: int, layer: tuple) -> tuple:
        if self.live and self.uses[i][0] is self.recording:
            hit = self.live.get(store.RefKey(name, e, *layer))
            if hit is not None:
                return hit
        table = self.resident.get((i, name))
        if table is not None:
            event = self.events.pop((i, name, e), None)
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
            return table[(e, layer)]
        ck = (i, name, e, layer)
        hit = self.current.get(ck)
        if hit is None:
            pf = self.prefetchers.get(i)
            ref = self.uses[i][0]
            if pf is not None:
                hit = pf.get((name, e, *layer))
            else:
                hit = ref.get((name, e, *layer), device=self.device, dtype=self.dtype)
            self.current[ck] = hit
        return hit


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


def _fused(q, k, v, b: int, plan: dict, uses: list, attn, heads: int):
    """CUDA, same token count: the plain attention and every reference branch in one kernel call (one launch
    sequence instead of two; SDPA is batch invariant there, so the plain rows equal an unpatched call's)."""
    qs, ks, vs, where = [q], [k], [v], []
    for i, entries in plan.items():
        for j, kr, vr in entries:
            if kr.shape[1] != k.shape[1]:
                return None
            qs.append(q[j * b : (j + 1) * b])
            ks.append(kr if b == 1 else kr.expand(b, -1, -1))
            vs.append(vr if b == 1 else vr.expand(b, -1, -1))
            where.append((j, uses[i][1]))
    out = attn(torch.cat(qs), torch.cat(ks), torch.cat(vs), heads)
    n = q.shape[0]
    base = out[:n]
    outs: dict[int, list] = {}
    for idx, (j, c) in enumerate(where):
        outs.setdefault(j, []).append((out[n + idx * b : n + (idx + 1) * b], c))
    _apply(base, b, outs)
    return base


def _apply(base, b: int, outs: dict) -> None:
    """base[chunk rows] ← blend with that chunk's reference outputs, in place."""
    for j, pairs in outs.items():
        rows = base[j * b : (j + 1) * b]
        if len(pairs) == 1:
            ref_out, c = pairs[0]
            rows.lerp_(ref_out if ref_out.dtype == rows.dtype else ref_out.to(rows.dtype), float(c))
        else:
            rows.copy_(rd.blend_outputs(rows, pairs))


def _blend(base, q, k, v, b: int, plan: dict, uses: list, attn, heads: int):
    """RFG-blend the planned batch chunks of `base` in place.

    On the CPU, where Forge's attention kernels are not batch-size invariant for every shape, a reference with the
    current token count is attended over the whole batch (reference K/V in the planned chunks' rows), the same call
    shape as `base`: a reference equal to the current K/V then gives back `base` bit for bit. On CUDA (SDPA kernels
    are batch invariant, see benchmarks/attention_batch_invariance.py) and for other token counts only the planned
    rows are attended, which is cheaper."""
    outs: dict[int, list] = {}  # chunk -> [(reference output rows, c)]
    for i, entries in plan.items():
        c = uses[i][1]
        if not q.is_cuda and all(kr.shape[1] == k.shape[1] for _, kr, _ in entries):
            ks, vs = list(k.split(b)), list(v.split(b))
            for j, kr, vr in entries:
                ks[j], vs[j] = kr.expand(b, -1, -1), vr.expand(b, -1, -1)
            ref_out = attn(q, torch.cat(ks), torch.cat(vs), heads)
            for j, _, _ in entries:
                outs.setdefault(j, []).append((ref_out[j * b : (j + 1) * b], c))
        else:
            for j, kr, vr in entries:
                rows = slice(j * b, (j + 1) * b)
                if b > 1:
                    kr, vr = kr.expand(b, -1, -1), vr.expand(b, -1, -1)
                outs.setdefault(j, []).append((attn(q[rows], kr, vr, heads), c))
    _apply(base, b, outs)
    return base


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


def finish_record(
    job: Job, trackers: dict[str, PassTracker], save_file: bool, interrupted: bool = False
) -> store.Reference:
    """Keep the recording as a reference (and save it), or, when the job was interrupted or a pass stopped short of
    its last step, discard it and raise the message that says so: a partial reference would blend steps that were
    never recorded as if they were."""
    for flush in job.flushers:
        flush()
    ref = job.record
    short = [f"{name} pass: step {t.step + 1} of {t.n_steps}" for name, t in trackers.items() if not t.complete]
    if interrupted or short:
        job.record = None
        where = "; ".join(short) or "the job was interrupted"
        raise ImgcondError(
            f"RefDrop: the recording of '{ref.name}' was interrupted ({where}) and was discarded; nothing was kept "
            "or saved. Record it again."
        )
    ref.meta["steps"] = {name: t.n_steps for name, t in trackers.items()}
    ref.meta["trace"] = {name: list(t.trace) for name, t in trackers.items()}
    if job.values.get("uncond"):  # list the uncond branch only where it was recorded
        for name, t in trackers.items():
            ref.meta["trace"][f"{name}_uncond"] = list(t.trace)
            ref.meta["steps"][f"{name}_uncond"] = t.n_steps
    ref.finalize()
    with library._LOCK:
        replaced = REFERENCES.pop(ref.name, None)
        REFERENCES[ref.name] = ref
    if replaced is not None:
        del replaced
        store.trim_host_memory()
    logger.info(
        "RefDrop reference '%s' recorded: %d tensors pairs, %s", ref.name, len(ref), store.format_bytes(ref.nbytes)
    )
    if save_file:
        path = library._file(ref.name)
        store.save_reference(ref, path)
        logger.info("RefDrop reference '%s' saved to %s", ref.name, path)
    return ref
