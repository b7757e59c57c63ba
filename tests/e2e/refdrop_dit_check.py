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
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
tb = importlib.import_module("tests.e2e.dit_backend")  # sets up the host's backend on import

import torch  # noqa: E402

from lib_imgcond.common import errors as imgcond_errors  # noqa: E402
from lib_imgcond.host import flux_attention, forge  # noqa: E402
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


def run(unet, v: dict | None, *, w=64, h=64, batch=1, cfg=1.0, noise_seed=5, image=None):
    """STEPS Euler steps of a w×h generation with RefDrop per `v` (None: off); (final latent, per-step preds)."""
    p = processing(unet, w, h, batch)
    job, pass_unet = None, unet.clone()
    sigmas = torch.linspace(0.9, 0.05, STEPS + 1)
    tracker = forge_patch.PassTracker("first", STEPS)
    tracker.schedule = [float(s) for s in sigmas]
    if v is not None:
        job = host.plan(p, v, 0, False)
        if image is not None:
            job.image_latent = image
        forge_install.install(pass_unet, job, tracker, None)
    x = tb.latent(TINY, batch, w, h, noise_seed)
    cond, uncond = TINY.cond(batch, 10), TINY.cond(batch, 20) if cfg != 1.0 else None
    x, preds = tb.sample(pass_unet, TINY, x, sigmas, cfg, cond, uncond)
    if job is not None and job.record is not None and v["mode"] == "Record":
        host.finish_record(job, {"first": tracker}, v["save"])
    if job is not None:
        host.release(job)
    return x, preds


def diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


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


def _first_call_tokens(model, x) -> int:
    """The token count of the first selected attention call of a plain model call (q's tokens)."""
    from lib_imgcond.host import dit_attention

    seen = []
    call = lambda: model(x, torch.full((x.shape[0],), 0.5), TINY.cond(x.shape[0], 10))  # noqa: E731
    if SITE is None:

        def flux_handler(q, k, v, pe, mask, options, call_next):
            seen.append(q.shape[2])
            return call_next(q, k, v, pe, mask)

        with flux_attention.handling(model, flux_handler):
            call()
        return seen[0]

    def handler(key, q, k, v, heads, mask, kw, original):
        seen.append(q.shape[2] if kw.get("skip_reshape") else q.shape[1])
        return original(q, k, v, heads, mask=mask, **kw)

    groups = [f"g{i}" for i in range(len(SITE.modules(model)))]
    with dit_attention.handling(SITE, model, groups, handler):
        call()
    return seen[0]


def our_span(model, x, tokens: int) -> list[int]:
    """Where RefDrop puts the image tokens of that call: the site's rule, or Flux's (after the prompt's tokens)."""
    if SITE is None:
        return list(refdrop_dit.image_span(model, x, TINY.cond(1, 10).shape[1], tokens))
    return list(SITE.span(model, x, tokens))


def main() -> None:
    out: dict = {"family_key": tb.OPTS.family}
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
        spans = {}
        model = unet.model.diffusion_model
        for w in (64, 96):
            x = tb.latent(TINY, 1, w, 64, 1)
            start, end = TINY.host_span(model, x, TINY.cond(1, 10))
            tokens = _first_call_tokens(model, x)
            spans[w] = [our_span(model, x, tokens), [start, end]]
            out.setdefault("span_tokens", {})[w] = tokens
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
    out["functions_restored"] = all(
        a is b for a, b in zip(functions(unet.model.diffusion_model), originals, strict=True)
    )
    out["hooks_left"] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.model.modules())
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    main()
