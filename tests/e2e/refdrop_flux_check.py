"""RefDrop through the host's own Flux backend on the CPU; run with the host's python from its folder.

    cd $IMGCOND_FORGE_DIR && $IMGCOND_FORGE_PYTHON <repo>/tests/e2e/refdrop_flux_check.py [--dtype float32|float64]

The tiny Flux, its UnetPatcher and the conditioning come from flux_backend_check (the Redux check). RefDrop's `plan`,
`install` (on a patcher clone, as `process_before_every_sampling` does) and `finish_record` are driven through the
host's `sampling_function` with Euler steps. Prints one JSON object; tests/e2e/test_refdrop_flux_backend.py asserts.
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
tiny = importlib.import_module("tests.e2e.flux_backend_check")  # sets up the host's backend on import

import torch  # noqa: E402
from backend.sampling.sampling_function import sampling_function, sampling_prepare  # noqa: E402

from lib_imgcond.common import errors as imgcond_errors  # noqa: E402
from lib_imgcond.host import capabilities as webui  # noqa: E402
from lib_imgcond.host import flux_attention, forge  # noqa: E402
from lib_imgcond.redux import forge_redux as redux_host  # noqa: E402
from lib_imgcond.redux.spec import SPEC as REDUX  # noqa: E402
from lib_imgcond.refdrop import file_format, forge_install, forge_library, forge_patch, reference  # noqa: E402
from lib_imgcond.refdrop import forge_refdrop as host  # noqa: E402
from lib_imgcond.refdrop.spec import SPEC  # noqa: E402
from lib_imgcond.spec.params import ImageInput  # noqa: E402

STEPS = 3


def values(**kw) -> dict:
    return SPEC.parse([{"mode": "Use", "reference": "ref", **kw}])


def processing(unet, w: int, h: int, batch: int = 1, seed: int = 1):
    return SimpleNamespace(
        sd_model=tiny.Flux(unet), width=w, height=h, steps=STEPS, batch_size=batch, sampler_name="",
        enable_hr=False, seed=seed, is_hr_pass=False,
    )  # fmt: skip


def run(unet, v: dict | None, *, w=64, h=64, batch=1, cfg=1.0, noise_seed=5, image=None, redux=None):
    """STEPS Euler steps of a w×h generation, RefDrop per `v` (None: off) and Redux per `redux` (its values, installed
    first, as the scripts' order does). Returns (final latent, per-step (cond, uncond) predictions)."""
    p = processing(unet, w, h, batch)
    job, tracker, pass_unet = None, None, unet.clone()
    if redux is not None:
        redux_host.install(pass_unet, redux_host.plan(p, redux))
    sigmas = torch.linspace(0.9, 0.0, STEPS + 1)
    if v is not None:
        job = host.plan(p, v, 0, False)
        if image is not None:
            job.image_latent = image
        tracker = forge_patch.PassTracker("first", STEPS)
        tracker.schedule = [float(s) for s in sigmas]
        forge_install.install(pass_unet, job, tracker, None)
    g = torch.Generator().manual_seed(noise_seed)
    x = torch.randn(batch, 16, h // 8, w // 8, generator=g).to(tiny.DTYPE)
    cond, uncond = tiny.conds(batch, 10), tiny.conds(batch, 20) if cfg != 1.0 else None
    denoiser = SimpleNamespace(
        inner_model=SimpleNamespace(inner_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=pass_unet))),
        p=SimpleNamespace(seeds=[1]),
    )
    sampling_prepare(pass_unet, x)
    preds = []
    for i in range(STEPS):
        params = SimpleNamespace(
            x=x, sigma=sigmas[i].repeat(batch), text_cond=cond, text_uncond=uncond, image_cond=None
        )
        den, cpred, upred = sampling_function(denoiser, params, cfg, [[(row, 1.0)] for row in range(batch)])
        preds.append((cpred, upred))
        x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
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


def main() -> None:
    out: dict = {"dtype": tiny.OPTS.dtype, "host": webui.capabilities().name, "model": tiny.OPTS.model}
    tmp = Path(tempfile.mkdtemp(prefix="imgcond-refdrop-flux-"))
    host.library.references_dir = lambda: str(tmp)
    forge.models_dir = lambda *parts: str(tmp.joinpath(*parts))
    unet = tiny.build_unet()
    model = unet.model.diffusion_model
    module = flux_attention.module_of(model)
    original = module.attention
    p = processing(unet, 64, 64)
    out["family"] = host.plan(p, values(mode="Record"), 0, False).family
    out["blocks"] = [len(model.double_blocks), len(model.single_blocks)]

    plain, _ = run(unet, None)
    out["c0_vs_plain"] = diff(run(unet, values(mode="Record", reference="same"))[0], plain)  # recording changes nothing
    out["record_is_plain"] = out["c0_vs_plain"] == 0.0
    ref = forge_library.REFERENCES["same"]
    out["ref_keys"] = len(ref)
    out["ref_layers"] = sorted(":".join(map(str, k)) for k in ref.layers("first"))
    first_key = next(iter(ref))
    out["ref_kv_shape"] = list(ref.get(first_key)[0].shape)
    out["same_c07_vs_plain"] = diff(run(unet, values(reference="same", coefficient=0.7))[0], plain)
    out["same_c0_vs_plain"] = diff(run(unet, values(reference="same", coefficient=0.0))[0], plain)
    # a reference from another seed: c = 0 exact, c = 0.5 and c = −0.3 differ from plain and from each other
    run(unet, values(mode="Record", reference="other"), noise_seed=9)
    out["other_c0_vs_plain"] = diff(run(unet, values(reference="other", coefficient=0.0))[0], plain)
    half, _ = run(unet, values(reference="other", coefficient=0.5))
    neg, _ = run(unet, values(reference="other", coefficient=-0.3))
    out["other_c05_vs_plain"] = diff(half, plain)
    out["other_cm03_vs_plain"] = diff(neg, plain)
    out["other_c05_vs_cm03"] = diff(half, neg)
    # layer selection: only the single blocks blended differs from all blocks
    singles, _ = run(unet, values(reference="other", coefficient=0.5, layers="single"))
    out["singles_vs_all"] = diff(singles, half)
    out["singles_vs_plain"] = diff(singles, plain)
    parts = {}
    for spec in ("double:0", "double:1", "single:0", "single:1"):
        parts[spec] = run(unet, values(reference="other", coefficient=0.5, layers=spec))[0]
        out[f"layer_{spec}_vs_plain"] = diff(parts[spec], plain)
    out["layer_parts_distinct"] = min(
        diff(a, b) for i, a in enumerate(parts.values()) for b in list(parts.values())[i + 1 :]
    )
    out["layer_sums"] = {k: float(v.double().sum()) for k, v in parts.items()}  # compared across hosts by eye
    # other sizes: record 64², use at 96×64 (and back)
    plain_wide, _ = run(unet, None, w=96)
    wide, _ = run(unet, values(reference="other", coefficient=0.5), w=96)
    out["wide_vs_plain"] = diff(wide, plain_wide)
    out["wide_finite"] = bool(torch.isfinite(wide).all())
    # CFG > 1: the uncond prediction is untouched unless the uncond branch is asked for
    cfg_plain, cfg_preds = run(unet, None, cfg=3.0)
    run(unet, values(mode="Record", reference="cfg", uncond=True), cfg=3.0, noise_seed=9)
    _, on_preds = run(unet, values(reference="cfg", coefficient=0.5), cfg=3.0)
    out["cfg_uncond_diff"] = diff(on_preds[0][1], cfg_preds[0][1])  # the first evaluation: the same x
    out["cfg_cond_diff"] = diff(on_preds[0][0], cfg_preds[0][0])
    _, both_preds = run(unet, values(reference="cfg", coefficient=0.5, uncond=True), cfg=3.0)
    out["cfg_uncond_asked_diff"] = diff(both_preds[0][1], cfg_preds[0][1])
    run(unet, values(mode="Record", reference="cfgsame", uncond=True), cfg=3.0)
    out["cfg_same_c07_vs_plain"] = diff(
        run(unet, values(reference="cfgsame", coefficient=0.7, uncond=True), cfg=3.0)[0], cfg_plain
    )
    # batch 2: the reference from batch item 1 blends into both rows
    plain_b2, _ = run(unet, None, batch=2)
    run(unet, values(mode="Record", reference="b2", batch_item=1), batch=2)
    out["batch_c0_vs_plain"] = diff(run(unet, values(reference="b2", coefficient=0.0), batch=2)[0], plain_b2)
    out["batch_c05_vs_plain"] = diff(run(unet, values(reference="b2", coefficient=0.5), batch=2)[0], plain_b2)
    # consistent batch (mode Batch) at batch 2: c = 0 and r = 0 exact, c = 0.5 changes both images; batch 1 refused
    batch_v = {"mode": "Batch", "coefficient": 0.5, "rate": 0.5}
    out["consistent_c0_vs_plain"] = diff(run(unet, values(**{**batch_v, "coefficient": 0.0}), batch=2)[0], plain_b2)
    out["consistent_r0_vs_plain"] = diff(run(unet, values(**{**batch_v, "rate": 0.0}), batch=2)[0], plain_b2)
    consistent, _ = run(unet, values(**batch_v), batch=2)
    out["consistent_rows_vs_plain"] = [diff(consistent[i], plain_b2[i]) for i in range(2)]
    out["consistent_again"] = diff(run(unet, values(**batch_v), batch=2)[0], consistent)
    out["err_consistent_batch1"] = error_of(lambda: host.plan(p, values(mode="Batch"), 0, False))
    # Image mode: reference from a latent (flow noising); c = 0 exact, c = 0.5 differs
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3)).to(tiny.DTYPE)
    out["image_c0_vs_plain"] = diff(
        run(unet, values(mode="Image", coefficient=0.0, image=ImageInput(tiny.picture(3))), image=latent)[0], plain
    )
    out["image_c05_vs_plain"] = diff(
        run(unet, values(mode="Image", coefficient=0.5, image=ImageInput(tiny.picture(3))), image=latent)[0], plain
    )
    # saved file: reload gives the same blend
    run(unet, values(mode="Record", reference="saved", save=True), noise_seed=9)
    before, _ = run(unet, values(reference="saved", coefficient=0.5))
    forge_library.REFERENCES.pop("saved")
    after, _ = run(unet, values(reference="saved", coefficient=0.5))
    out["saved_reload_diff"] = diff(before, after)
    out["saved_family"] = file_format.reference_info(tmp / "saved.safetensors")["family"]
    # with Redux's attention bias at once (Forge 2.0: both handlers nest in the one swap; Neo: the bias arrives as
    # the blocks' attn_mask): c = 0 is Redux alone exactly, c = 0.5 differs from it
    tiny.write_models(tmp)
    rx = REDUX.parse([{"image1": ImageInput(tiny.picture(1)), "strength_type1": "attn_bias", "strength1": 0.5}])
    redux_alone, _ = run(unet, None, redux=rx)
    out["redux_vs_plain"] = diff(redux_alone, plain)
    out["redux_refdrop_c0_vs_redux"] = diff(
        run(unet, values(reference="other", coefficient=0.0), redux=rx)[0], redux_alone
    )
    both, _ = run(unet, values(reference="other", coefficient=0.5), redux=rx)
    out["redux_refdrop_c05_vs_redux"] = diff(both, redux_alone)
    out["redux_refdrop_c05_vs_refdrop"] = diff(both, half)
    # errors: an SD reference on Flux, a reference from a Flux of other shapes, bad layers
    forge_library.REFERENCES["sdref"] = reference.Reference("sdref", "sd15", {"trace": {}, "width": 64, "height": 64})
    other_shape = reference.Reference("shape", "flux:19+38@3072", {"trace": {}, "width": 64, "height": 64})
    forge_library.REFERENCES["shape"] = other_shape
    out["err_sd_ref"] = error_of(lambda: host.plan(p, values(reference="sdref"), 0, False))
    out["err_shape_ref"] = error_of(lambda: host.plan(p, values(reference="shape"), 0, False))
    out["err_layers"] = error_of(lambda: host.plan(p, values(reference="same", layers="output:0"), 0, False))
    out["attention_restored"] = module.attention is original
    out["cuda_initialized"] = torch.cuda.is_initialized()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    main()
