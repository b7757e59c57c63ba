"""RefDrop through Forge Neo's own backend on a tiny DiT of one family; run with the host's python from its folder.

    cd $IMGCOND_FORGE_DIR && $IMGCOND_FORGE_PYTHON <repo>/tests/e2e/refdrop_dit_check.py --family zimage

RefDrop's `plan`, `install` (on a patcher clone, as `process_before_every_sampling` does) and `finish_record` are
driven through the host's `sampling_function` with Euler steps. Prints one JSON object;
tests/e2e/test_refdrop_dit_backend.py asserts.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
tb = importlib.import_module("tests.e2e.dit_backend")  # sets up the host's backend on import

import torch  # noqa: E402

from lib_imgcond.common import errors as imgcond_errors  # noqa: E402
from lib_imgcond.host import dit_attention, flux_attention, forge  # noqa: E402
from lib_imgcond.host.sites import registry as sites  # noqa: E402
from lib_imgcond.refdrop import file_format, forge_install, forge_library, forge_patch, reference  # noqa: E402
from lib_imgcond.refdrop import forge_dit as refdrop_dit  # noqa: E402
from lib_imgcond.refdrop import forge_refdrop as host  # noqa: E402
from lib_imgcond.refdrop.spec import SPEC  # noqa: E402
from lib_imgcond.spec.params import ImageInput  # noqa: E402
from tests.e2e.tiny_dit import builders  # noqa: E402

STEPS = 3
TINY = builders()[tb.OPTS.family]()


def values(**kw) -> dict:
    return SPEC.parse([{"mode": "Use", "reference": "ref", **kw}])


def processing(unet, w: int, h: int, batch: int = 1):
    return SimpleNamespace(
        sd_model=tb.engine(TINY, unet), width=w, height=h, steps=STEPS, batch_size=batch, sampler_name="",
        enable_hr=False, seed=1, is_hr_pass=False,
    )  # fmt: skip


def run(unet, v: dict | None, *, w=64, h=64, batch=1, cfg=1.0, noise_seed=5, image=None, frames=None, clip=0):
    """STEPS Euler steps of a w×h generation with RefDrop per `v` (None: off); (final latent, per-step preds).
    `frames`: a latent of that many frames (default: the family's); `clip`: a video generation of that many latent
    frames as Neo's Wan engine runs it (one clip; the batch size counts its 4·(T − 1) + 1 pixel frames;
    `dynamic_args.wan` set by the caller)."""
    p = processing(unet, w, h, 4 * (clip - 1) + 1 if clip else batch)
    job, pass_unet = None, unet.clone()
    sigmas = torch.linspace(0.9, 0.05, STEPS + 1)
    tracker = forge_patch.PassTracker("first", STEPS)
    tracker.schedule = [float(s) for s in sigmas]
    if v is not None:
        job = host.plan(p, v, 0, False)
        if image is not None:
            job.image_latent = image
        forge_install.install(pass_unet, job, tracker, None)
    x = tb.latent(TINY, batch, w, h, noise_seed, frames=clip or frames)
    cond, uncond = TINY.cond(batch, 10), TINY.cond(batch, 20) if cfg != 1.0 else None
    x, preds = tb.sample(pass_unet, TINY, x, sigmas, cfg, cond, uncond)
    if job is not None and job.record is not None and v["mode"] == "Record":
        host.finish_record(job, {"first": tracker}, v["save"])
    if job is not None:
        host.release(job)
    return x, preds


def diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def finite(t) -> bool:
    return bool(torch.isfinite(t).all())


def error_of(fn) -> str | None:
    try:
        fn()
    except imgcond_errors.ImgcondError as e:
        return str(e)
    return None


SITE = sites.site(forge.model_family(tb.engine(TINY, None)))  # None: a Flux-family model (Flux's own path)


def functions(model) -> list:
    """The host's functions RefDrop swaps during a model call: the site's, or the `attention` Flux's blocks call."""
    if SITE is None:
        return [flux_attention.module_of(model).attention]
    return [getattr(importlib.import_module(m), n) for m, n in SITE.functions]


def call_kwargs(batch: int) -> dict:
    return TINY.call_kwargs(batch) if TINY.call_kwargs is not None else {}


def _spans(unet, site, w: int) -> list:
    """[the site's span, the host's] of the first selected attention call of a plain w×64 model call."""
    model = unet.model.diffusion_model
    x = tb.latent(TINY, 1, w, 64, 1)
    start, end = TINY.host_span(model, x, TINY.cond(1, 10))
    return [_first_call_span(model, site, x), [start, end]]


def _first_call_span(model, site, x) -> list[int]:
    """The site's image span in the first selected attention call of a plain model call (on a Flux-family model,
    Flux's rule: after the prompt's tokens)."""
    if site is None:
        return list(refdrop_dit.image_span(model, x, TINY.cond(1, 10).shape[1], _first_call_tokens(model, site, x)))
    seen, calling = [], []
    c = call_kwargs(x.shape[0])
    extra = dit_attention.call_inputs(site, model, x, c)

    def handler(key, q, k, v, heads, mask, kw, original):
        tokens = q.shape[2] if kw.get("skip_reshape") else q.shape[1]
        seen.append(list(dit_attention.image_span(site, model, x, tokens, calling[0].inputs, extra)))
        return original(q, k, v, heads, mask=mask, **kw)

    groups = [f"g{i}" for i in range(len(site.modules(model)))]
    with dit_attention.handling(site, model, groups, handler) as state:
        calling.append(state)
        model(x, torch.full((x.shape[0],), 0.5), TINY.cond(x.shape[0], 10), **c)
    return seen[0]


def _first_call_tokens(model, site, x) -> int:
    """The token count of the first selected attention call of a plain model call (q's tokens)."""
    seen = []
    if site is None:

        def flux_handler(q, k, v, pe, mask, options, call_next):
            seen.append(q.shape[2])
            return call_next(q, k, v, pe, mask)

        with flux_attention.handling(model, flux_handler):
            model(x, torch.full((x.shape[0],), 0.5), TINY.cond(x.shape[0], 10), **call_kwargs(x.shape[0]))
        return seen[0]

    def handler(key, q, k, v, heads, mask, kw, original):
        seen.append(q.shape[2] if kw.get("skip_reshape") else q.shape[1])
        return original(q, k, v, heads, mask=mask, **kw)

    groups = [f"g{i}" for i in range(len(site.modules(model)))]
    with dit_attention.handling(site, model, groups, handler):
        model(x, torch.full((x.shape[0],), 0.5), TINY.cond(x.shape[0], 10), **call_kwargs(x.shape[0]))
    return seen[0]


@contextmanager
def first_output(module):
    """Collects the output of `module`'s first call inside the block."""
    seen: list = []
    hook = module.register_forward_hook(lambda _m, _a, out: seen.append(out) if not seen else None)
    try:
        yield seen
    finally:
        hook.remove()


def edit_checks(unet, plain) -> dict:
    """An edit model: Record and Use with reference latents in the model calls blend the generated image's tokens only
    (the reference latents' tokens and the text are context: their attention output is the plain one)."""
    model = unet.model.diffusion_model
    site = sites.site(forge.model_family(tb.engine(TINY, None)))
    out: dict = {}
    with TINY.edit([tb.latent(TINY, 1, 96, 64, 7)]):  # a reference image of another size: 24 tokens after the 16
        x = tb.latent(TINY, 1, 64, 64, 1)
        start, end = TINY.host_span(model, x, TINY.cond(1, 10))
        out["edit_spans"] = [_first_call_span(model, site, x), [start, end]]
        with first_output(site.modules(model)[0][0]) as plain_out:
            plain_edit, _ = run(unet, None)
        out["edit_plain_vs_plain"] = diff(plain_edit, plain)  # the references reach the model
        run(unet, values(mode="Record", reference="edit_same"))
        ref = forge_library.REFERENCES["edit_same"]
        out["edit_ref_kv_shape"] = list(ref.get(next(iter(ref)))[0].shape)
        out["edit_same_c07_vs_plain"] = diff(run(unet, values(reference="edit_same", coefficient=0.7))[0], plain_edit)
        with first_output(site.modules(model)[0][0]) as use_out:
            blended, _ = run(unet, values(reference="other", coefficient=0.5))
        out["edit_c05_vs_plain"] = diff(blended, plain_edit)
        (img_p, rest_p), (img_u, rest_u) = (TINY.split_output(o[0], end - start) for o in (plain_out, use_out))
        out["edit_image_rows_diff"], out["edit_other_rows_diff"] = diff(img_u, img_p), diff(rest_u, rest_p)
        out["edit_other_rows"] = int(rest_p.shape[1])
    return out


def main() -> None:
    out: dict = {"family_key": forge.model_family(tb.engine(TINY, None)), "builder": tb.OPTS.family}
    tmp = Path(tempfile.mkdtemp(prefix="imgcond-refdrop-dit-"))
    host.library.references_dir = lambda: str(tmp)
    forge.models_dir = lambda *parts: str(tmp.joinpath(*parts))
    unet = tb.build_unet(TINY)
    originals = functions(unet.model.diffusion_model)
    p = processing(unet, 64, 64)
    out["family"] = host.plan(p, values(mode="Record"), 0, False).family
    plain, _ = run(unet, None)
    out["span_checked"] = TINY.host_span is not None
    if TINY.host_span is not None:  # the site's rule against the host's own intermediates, two sizes
        site = sites.site(forge.model_family(tb.engine(TINY, None)))
        spans = {}
        for w in (64, 96):
            spans[w] = _spans(unet, site, w)
            if TINY.extra_tokens is not None:  # the host's extra tokens in the call: the image span stays its own
                with TINY.extra_tokens(tb.latent(TINY, 1, w, 64, 1)):
                    spans[f"{w}+extra"] = _spans(unet, site, w)
        out["spans"] = spans
    out["plain_std"] = float(plain.double().std())
    out["plain_finite"] = bool(torch.isfinite(plain).all())
    out["record_vs_plain"] = diff(run(unet, values(mode="Record", reference="same"))[0], plain)
    ref = forge_library.REFERENCES["same"]
    out["ref_keys"] = len(ref)
    out["ref_layers"] = sorted(":".join(map(str, k)) for k in ref.layers("first"))
    out["ref_kv_shape"] = list(ref.get(next(iter(ref)))[0].shape)
    out["same_c07_vs_plain"] = diff(run(unet, values(reference="same", coefficient=0.7))[0], plain)
    out["same_c0_vs_plain"] = diff(run(unet, values(reference="same", coefficient=0.0))[0], plain)
    run(unet, values(mode="Record", reference="other"), noise_seed=9)
    out["other_c0_vs_plain"] = diff(run(unet, values(reference="other", coefficient=0.0))[0], plain)
    half, _ = run(unet, values(reference="other", coefficient=0.5))
    neg, _ = run(unet, values(reference="other", coefficient=-0.3))
    out["other_c05_vs_plain"] = diff(half, plain)
    out["other_cm03_vs_plain"] = diff(neg, plain)
    out["other_c05_vs_cm03"] = diff(half, neg)
    out["edit_checked"] = TINY.edit is not None
    if TINY.edit is not None:
        out.update(edit_checks(unet, plain))
    layers = {}  # every block matters: each one alone moves the image, and differently
    for name in out["ref_layers"]:
        group, index = name.split(":")[:2]
        layers[name] = run(unet, values(reference="other", coefficient=0.5, layers=f"{group}:{index}"))[0]
    out["layer_vs_plain"] = {k: diff(v, plain) for k, v in layers.items()}
    items = list(layers.values())
    out["layers_distinct"] = min((diff(a, b) for i, a in enumerate(items) for b in items[i + 1 :]), default=1.0)
    plain_wide, _ = run(unet, None, w=96)  # recorded at 64², used at 96×64
    wide, _ = run(unet, values(reference="other", coefficient=0.5), w=96)
    out["wide_vs_plain"] = diff(wide, plain_wide)
    out["wide_finite"] = bool(torch.isfinite(wide).all())
    cfg_plain, cfg_preds = run(unet, None, cfg=3.0)  # CFG: the uncond branch untouched unless asked
    run(unet, values(mode="Record", reference="cfg", uncond=True), cfg=3.0, noise_seed=9)
    _, on_preds = run(unet, values(reference="cfg", coefficient=0.5), cfg=3.0)
    out["cfg_uncond_diff"] = diff(on_preds[0][1], cfg_preds[0][1])
    out["cfg_cond_diff"] = diff(on_preds[0][0], cfg_preds[0][0])
    _, both_preds = run(unet, values(reference="cfg", coefficient=0.5, uncond=True), cfg=3.0)
    out["cfg_uncond_asked_diff"] = diff(both_preds[0][1], cfg_preds[0][1])
    run(unet, values(mode="Record", reference="cfgsame", uncond=True), cfg=3.0)
    cfg_same = run(unet, values(reference="cfgsame", coefficient=0.7, uncond=True), cfg=3.0)[0]
    out["cfg_same_c07_vs_plain"] = diff(cfg_same, cfg_plain)
    plain_b2, _ = run(unet, None, batch=2)  # batch 2: item 1's reference blends into both rows
    run(unet, values(mode="Record", reference="b2", batch_item=1), batch=2)
    out["batch_c0_vs_plain"] = diff(run(unet, values(reference="b2", coefficient=0.0), batch=2)[0], plain_b2)
    out["batch_c05_vs_plain"] = diff(run(unet, values(reference="b2", coefficient=0.5), batch=2)[0], plain_b2)
    batch_v = {"mode": "Batch", "coefficient": 0.5, "rate": 0.5}  # consistent batch
    out["consistent_c0_vs_plain"] = diff(run(unet, values(**{**batch_v, "coefficient": 0.0}), batch=2)[0], plain_b2)
    consistent, _ = run(unet, values(**batch_v), batch=2)
    out["consistent_rows_vs_plain"] = [diff(consistent[i], plain_b2[i]) for i in range(2)]
    latent = tb.latent(TINY, 1, 64, 64, 3)  # Image mode: the reference from a latent, noised on the flow schedule
    picture = ImageInput(__import__("PIL.Image").Image.new("RGB", (64, 64), (90, 120, 200)))
    out["image_c0_vs_plain"] = diff(
        run(unet, values(mode="Image", coefficient=0.0, image=picture), image=latent)[0], plain
    )
    out["image_c05_vs_plain"] = diff(
        run(unet, values(mode="Image", coefficient=0.5, image=picture), image=latent)[0], plain
    )
    run(unet, values(mode="Record", reference="saved", save=True), noise_seed=9)  # saved file: reload, same blend
    before, _ = run(unet, values(reference="saved", coefficient=0.5))
    forge_library.REFERENCES.pop("saved")
    after, _ = run(unet, values(reference="saved", coefficient=0.5))
    out["saved_reload_diff"] = diff(before, after)
    out["saved_family"] = file_format.reference_info(tmp / "saved.safetensors")["family"]
    meta = {"trace": {}, "width": 64, "height": 64}  # references of other families or shapes: clear errors
    forge_library.REFERENCES["sdref"] = reference.Reference("sdref", "sd15", meta)
    forge_library.REFERENCES["fluxref"] = reference.Reference("fluxref", "flux:19+38@3072", meta)
    out["err_sd_ref"] = error_of(lambda: host.plan(p, values(reference="sdref"), 0, False))
    out["err_flux_ref"] = error_of(lambda: host.plan(p, values(reference="fluxref"), 0, False))
    out["err_layers"] = error_of(lambda: host.plan(p, values(reference="same", layers="output:0"), 0, False))
    if TINY.refused_frames:  # a latent of several frames: refused before the model runs, the host left as it was
        out["err_frames"] = error_of(
            lambda: run(unet, values(mode="Record", reference="f"), frames=TINY.refused_frames)
        )
    if TINY.extra_tokens is not None:
        out["extra"] = extra_checks(unet)
    if TINY.clip_frames:
        out["clip"] = clip_checks(unet, TINY.clip_frames)
    out["functions_restored"] = all(
        a is b for a, b in zip(functions(unet.model.diffusion_model), originals, strict=True)
    )
    out["hooks_left"] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.model.modules())
    print("RESULT " + json.dumps(out))


def extra_checks(unet) -> dict:
    """Under the host state that adds tokens besides the image's (Anima's reference latent): they are context the
    reference branch keeps, so a same-seed Record → Use gives the plain image and a reference holds image tokens."""
    out: dict = {}
    without, _ = run(unet, None)
    x = tb.latent(TINY, 1, 64, 64, 1)
    with TINY.extra_tokens(x):
        site = sites.site(forge.model_family(tb.engine(TINY, None)))
        out["call_tokens"] = _first_call_tokens(unet.model.diffusion_model, site, x)
        plain, _ = run(unet, None)
        out["record_vs_plain"] = diff(run(unet, values(mode="Record", reference="xsame"))[0], plain)
        ref = forge_library.REFERENCES["xsame"]
        out["ref_kv_shape"] = list(ref.get(next(iter(ref)))[0].shape)
        out["same_c07_vs_plain"] = diff(run(unet, values(reference="xsame", coefficient=0.7))[0], plain)
        run(unet, values(mode="Record", reference="xother"), noise_seed=9)
        out["other_c05_vs_plain"] = diff(run(unet, values(reference="xother", coefficient=0.5))[0], plain)
    out["plain_vs_without"] = diff(plain, without)  # the extra tokens do reach the image
    return out


def clip_checks(unet, frames: int) -> dict:
    """A video family's clips of several frames, as Neo's Wan engine generates them (`dynamic_args.wan`: one clip,
    the batch size counts its pixel frames): the K/V of every frame recorded and blended, the size estimate counts
    frames, references of another frame count blend, and what a clip cannot do is refused."""
    from backend.args import dynamic_args

    from lib_imgcond.refdrop import precision

    out: dict = {"frames": frames}
    before, dynamic_args.wan = dynamic_args.wan, True
    try:
        site = sites.site(forge.model_family(tb.engine(TINY, None)))
        model = unet.model.diffusion_model
        x = tb.latent(TINY, 1, 64, 64, 1, frames=frames)
        out["span"] = [_first_call_span(model, site, x), list(TINY.host_span(model, x, TINY.cond(1, 10)))]
        p = processing(unet, 64, 64, 4 * (frames - 1) + 1)
        record = values(mode="Record", reference="clip")
        out["estimate"] = host.estimate_record(p, record, precision.AS_COMPUTED)
        out["estimate_one_frame"] = host.estimate_record(processing(unet, 64, 64, 1), record, precision.AS_COMPUTED)
        plain, _ = run(unet, None, clip=frames)
        out["plain_std"], out["plain_finite"] = float(plain.double().std()), finite(plain)
        out["record_vs_plain"] = diff(run(unet, record, clip=frames)[0], plain)
        ref = forge_library.REFERENCES["clip"]
        out["recorded_bytes"] = ref.nbytes
        out["ref_kv_shape"] = list(ref.get(next(iter(ref)))[0].shape)
        out["same_c07_vs_plain"] = diff(run(unet, values(reference="clip", coefficient=0.7), clip=frames)[0], plain)
        run(unet, values(mode="Record", reference="clip_other"), clip=frames, noise_seed=9)
        out["other_c0_vs_plain"] = diff(run(unet, values(reference="clip_other", coefficient=0.0), clip=frames)[0],
                                        plain)  # fmt: skip
        half, _ = run(unet, values(reference="clip_other", coefficient=0.5), clip=frames)
        out["other_c05_vs_plain"] = diff(half, plain)
        cfg_plain, _ = run(unet, None, cfg=3.0, clip=frames)  # CFG, the uncond branch recorded and blended
        run(unet, values(mode="Record", reference="clip_cfg", uncond=True), cfg=3.0, clip=frames)
        same = run(unet, values(reference="clip_cfg", coefficient=0.7, uncond=True), cfg=3.0, clip=frames)[0]
        out["cfg_same_c07_vs_plain"] = diff(same, cfg_plain)
        # another frame count: the reference branch attends the reference's own tokens (its frames' RoPE positions)
        fewer_plain, _ = run(unet, None, clip=frames - 1)
        fewer, _ = run(unet, values(reference="clip_other", coefficient=0.5), clip=frames - 1)
        out["fewer_frames_vs_plain"], out["fewer_frames_finite"] = diff(fewer, fewer_plain), finite(fewer)
        one, _ = run(unet, values(reference="other", coefficient=0.5), clip=frames)  # one image's reference
        out["one_frame_ref_vs_plain"], out["one_frame_ref_finite"] = diff(one, plain), finite(one)
        # mode Image: the image's one-frame latent runs as a still clip of the clip's frames (Wan I2V concatenates
        # its per-frame start-image latent to every model input, which must have the clip's frames)
        image = tb.latent(TINY, 1, 64, 64, 3)
        picture = ImageInput(__import__("PIL.Image").Image.new("RGB", (64, 64), (90, 120, 200)))
        inputs = []
        hook = model.register_forward_pre_hook(lambda _m, a: inputs.append(list(a[0].shape)))
        try:
            zero, _ = run(unet, values(mode="Image", coefficient=0.0, image=picture), image=image, clip=frames)
        finally:
            hook.remove()
        out["image_inputs"] = inputs
        out["image_c0_vs_plain"] = diff(zero, plain)
        half, _ = run(unet, values(mode="Image", coefficient=0.5, image=picture), image=image, clip=frames)
        out["image_c05_vs_plain"] = diff(half, plain)
        out["err_batch_item"] = error_of(lambda: host.plan(p, values(mode="Record", batch_item=1), 0, False))
        batch = values(mode="Batch", coefficient=0.5, rate=0.5)
        out["err_batch_mode"] = error_of(lambda: host.plan(p, batch, 0, False))
    finally:
        dynamic_args.wan = before
    return out


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    main()
