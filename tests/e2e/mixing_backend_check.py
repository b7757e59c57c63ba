"""Hires iterative mixing through the host's own backend on a tiny model of one family; run with the host's python from
the host's folder:

    cd $IMGCOND_FORGE_DIR && $IMGCOND_FORGE_PYTHON <repo>/tests/e2e/mixing_backend_check.py --model zimage

`--model` names a tiny builder: a family key, or a variant of a family (its family is its engine's). A family hires
mixing refuses is only checked for its refusal; a builder whose host class this host lacks reports that.

The hires pass as the WebUI runs it, reduced to its sampling: the family's predictor as the host's engine builds it
(Neo: the engine's own `_get_predictor` on its model config), the pass's schedule (the tail, at denoising strength
DENOISE, of a schedule read off the predictor's sigmas), the start state from the predictor's `noise_scaling` of the
upscaled latent, and the host's k-diffusion sampling function called as `KDiffusionSampler.sample_img2img` calls it,
its denoiser evaluating through the host's `sampling_function`. `forge_mixing.install` wraps the sampler's `func` as
`process_before_every_sampling` does. Prints one JSON object; tests/e2e/test_mixing_backend.py asserts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
FORGE = Path.cwd()
_cli = argparse.ArgumentParser()
_cli.add_argument("--model", required=True, help="a builder of tests/e2e/tiny_models.py or tests/e2e/tiny_dits/")
OPTS = _cli.parse_args()
NEO = (FORGE / "modules_forge" / "packages").is_dir()
sys.argv = [sys.argv[0], "--cpu" if NEO else "--always-cpu"]  # the backend reads its flags from sys.argv at import
for extra in (REPO, FORGE, FORGE / "packages_3rdparty", FORGE / "modules_forge" / "packages"):
    sys.path.insert(0, str(extra))
sys.path.insert(0, str(FORGE / "repositories" / "huggingface_guess"))

import importlib  # noqa: E402

import torch  # noqa: E402
from backend import args as backend_args  # noqa: E402
from backend import memory_management as mm  # noqa: E402
from backend.modules import k_prediction  # noqa: E402
from backend.patcher.unet import UnetPatcher  # noqa: E402
from backend.sampling.sampling_function import sampling_function, sampling_prepare  # noqa: E402
from k_diffusion import external as kd_external  # noqa: E402
from k_diffusion import sampling as kd  # noqa: E402

from lib_imgcond.common.errors import ImgcondError  # noqa: E402
from lib_imgcond.host import forge  # noqa: E402
from lib_imgcond.mixing import forge_mixing  # noqa: E402
from lib_imgcond.mixing.schedules import MixParams  # noqa: E402
from tests.e2e import tiny_dit, tiny_models  # noqa: E402

DTYPE = torch.float32
STEPS, DENOISE = 8, 0.75  # the hires pass: 8 steps at denoising strength 0.75 sample the last 7 sigmas
SAMPLERS = ("sample_euler", "sample_euler_ancestral", "sample_dpmpp_2m", "sample_heun")
SIZE = 64  # hires width and height in pixels (the latent is SIZE / 8)
ENGINE = {family: engine for engine, family in forge.ENGINE_FAMILIES.items()}
# the engines that build their predictor from the checkpoint's diffusers scheduler (SD's discrete eps schedule)
SCHEDULER_FAMILIES = ("sd15", "sd2", "sdxl", "sdxl_refiner")


# --- the family's model and predictor --------------------------------------------------------------------------------
def engine_class(name: str):
    """The host's engine class `name`, from the backend/diffusion_engine module that defines it (only that one is
    imported)."""
    for path in sorted((FORGE / "backend" / "diffusion_engine").glob("*.py")):
        if re.search(rf"^class {name}\(", path.read_text(errors="replace"), re.M):
            return getattr(importlib.import_module(f"backend.diffusion_engine.{path.stem}"), name)
    raise LookupError(f"the host has no engine class {name}")


def predictor(family: str):
    """The predictor the host's engine gives this family's checkpoints."""
    if family in SCHEDULER_FAMILIES:
        config = SimpleNamespace(
            prediction_type="epsilon", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            num_train_timesteps=1000,
        )  # fmt: skip
        return k_prediction.k_prediction_from_diffusers_scheduler(SimpleNamespace(config=config))
    engine = engine_class(ENGINE[family])
    if NEO:  # the engine's own choice from its model config: ModelType FLOW -> DiscreteFlow, else Flux's
        config = engine.matched_guesses[0]({})
        config.model_type = config.model_type({})  # what Neo's loader does with the detected state dict
        return engine._get_predictor(SimpleNamespace(model_config=config))
    # Forge 2.0's engines build theirs in __init__ (backend/diffusion_engine/flux.py, chroma.py, sd35.py)
    if family == "flux":
        return k_prediction.PredictionFlux(seq_len=4096, base_seq_len=256, max_seq_len=4096, base_shift=0.5,
                                           max_shift=1.15)  # fmt: skip
    if family == "chroma":
        return k_prediction.PredictionFlux(mu=1.0)
    if family == "sd3":
        return k_prediction.PredictionDiscreteFlow(shift=3.0)
    raise LookupError(f"no Forge 2.0 predictor for {family}")


def tiny_model(name: str) -> tiny_dit.Tiny:
    builders = {**tiny_models.BUILDERS, **tiny_dit.builders()}
    return builders[name]()


def build_unet(tiny: tiny_dit.Tiny, pred) -> UnetPatcher:
    model = tiny.model.to(DTYPE).eval().requires_grad_(False)
    model.storage_dtype = model.computation_dtype = DTYPE
    model.load_device = mm.get_torch_device()
    model.initial_device = torch.device("cpu")
    model.offload_device = mm.unet_offload_device()
    config = SimpleNamespace(memory_usage_factor=1.0)
    if NEO:
        backend_args.dynamic_args.ops = "ForgeOperations"  # what Neo's loader sets before building a KModel
    unet = UnetPatcher.from_model(model=model, diffusers_scheduler=None, k_predictor=pred, config=config)
    extra = getattr(tiny, "call_kwargs", None)  # keyword inputs another extension adds to every model call
    if extra is not None:

        def with_extra(apply_model, args):
            return apply_model(args["input"], args["timestep"], **args["c"], **extra(args["input"].shape[0]))

        unet.set_model_unet_function_wrapper(with_extra)
    return unet


# --- the hires pass ---------------------------------------------------------------------------------------------------
class Denoiser:
    """What KDiffusionSampler hands its sampling function (CFGDenoiserKDiffusion, reduced): called as
    model(x, sigma, **extra_args), `inner_model` the host's ForgeScheduleLinker (k-diffusion reads its predictor),
    `inner_model.inner_model` the engine, `step` counting model calls; evaluates through the host's
    sampling_function."""

    def __init__(self, engine, pred):
        self.inner_model = kd_external.ForgeScheduleLinker(pred)
        self.inner_model.inner_model = engine
        self.p = SimpleNamespace(seeds=[1])
        self.step = 0
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x, sigma, cond=None, uncond=None, cond_scale=1.0, **_):
        self.inputs.append(x.detach().clone())
        self.step += 1
        params = SimpleNamespace(x=x, sigma=sigma, text_cond=cond, text_uncond=uncond, image_cond=None)
        composition = [[(row, 1.0)] for row in range(x.shape[0])]
        return sampling_function(self, params, cond_scale, composition)[0]


def schedule(pred, steps: int) -> torch.Tensor:
    """`steps` sigmas evenly spaced over the predictor's own table, largest first, then 0."""
    table = pred.sigmas.float()
    picked = [float(table[-(1 + int(i * len(table) / steps))]) for i in range(steps)]
    return torch.tensor([*picked, 0.0])


def hires_pass(tiny, unet, pred, func_name: str, z_up, noise, params: MixParams | None, batch: int = 1):
    """One hires pass: `sample_img2img`'s steps with `params` mixing (None: plain). (result, denoiser, mixers)."""
    attrs = {"forge_objects": SimpleNamespace(unet=unet), **getattr(tiny, "engine_attrs", {})}
    engine = type(tiny.engine, (), attrs)()
    denoiser = Denoiser(engine, pred)
    sampler = SimpleNamespace(func=getattr(kd, func_name), model_wrap_cfg=denoiser)
    p = SimpleNamespace(sd_model=engine, sampler=sampler, seeds=[7], seed=7, hr_sampler_name=func_name,
                        sampler_name=func_name, extra_generation_params={})  # fmt: skip
    mixers = []
    if params is not None:  # process_before_every_sampling, with the hook's x and noise
        forge_mixing.check_model(p)
        assert forge_mixing.install(p, params, z_up, noise, on_mixer=mixers.append)
    sigmas = schedule(pred, STEPS)
    t_enc = int(min(DENOISE, 0.999) * STEPS)
    sched = sigmas[STEPS - t_enc - 1 :]
    xi = pred.noise_scaling(sched[0].reshape(1), noise, z_up)
    sampling_prepare(unet, xi)
    extra = {"cond": tiny.cond(batch, 10), "uncond": None, "cond_scale": 1.0, "image_cond": None}
    torch.manual_seed(3)  # the ancestral samplers' noise
    out = sampler.func(denoiser, xi, extra_args=extra, disable=True, callback=None, sigmas=sched)
    return out, denoiser, mixers, sched


def latent(tiny, batch: int, seed: int) -> torch.Tensor:
    """A (B, C, H, W) latent, (B, C, T, H, W) for a video family, of the hires size."""
    down = getattr(tiny, "downscale", 8)  # image pixels per latent pixel
    shape = (batch, tiny.channels, *((tiny.frames,) if tiny.frames else ()), SIZE // down, SIZE // down)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DTYPE)


def diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def main() -> None:
    try:
        tiny = tiny_model(OPTS.model)
    except ImportError as e:  # a builder of the other host's family
        print("RESULT " + json.dumps({"model": OPTS.model, "unavailable": str(e)}))
        return
    family = forge.ENGINE_FAMILIES[tiny.engine]
    if family not in forge_mixing.FAMILIES:
        try:
            forge_mixing.check_model(SimpleNamespace(sd_model=type(tiny.engine, (), {})()))
        except ImgcondError as e:
            print("RESULT " + json.dumps({"model": OPTS.model, "family": family, "refused": str(e)}))
            return
        raise AssertionError(f"{family} is not in forge_mixing.FAMILIES but check_model let it through")
    pred = predictor(family)
    unet = build_unet(tiny, pred)
    batch = 1
    g = torch.Generator().manual_seed(11)
    z_up = latent(tiny, batch, 21)  # the upscaled first-pass latent
    noise = torch.randn(z_up.shape, generator=g)
    out: dict = {"model": OPTS.model, "family": family, "host": "neo" if NEO else "forge", "shape": list(z_up.shape)}
    out["predictor"] = type(pred).__name__
    out["prediction_type"] = pred.prediction_type
    functions = {name: getattr(kd, name) for name in SAMPLERS}
    options_before = repr(sorted(unet.model_options))
    runs = {}
    for name in SAMPLERS:
        plain, plain_den, _, sched = hires_pass(tiny, unet, pred, name, z_up, noise, None)
        zero, _, zero_mixers, _ = hires_pass(tiny, unet, pred, name, z_up, noise, MixParams(blend_max=0.0))
        on, on_den, on_mixers, _ = hires_pass(tiny, unet, pred, name, z_up, noise, MixParams(alpha=1.0))
        again, _, _, _ = hires_pass(tiny, unet, pred, name, z_up, noise, None)
        mixer = on_mixers[0]
        host_zprimes = [pred.noise_scaling(torch.tensor([s]), noise, z_up) for s in mixer.sigmas[:-1]]
        runs[name] = {
            "plain_finite": bool(torch.isfinite(plain).all()),
            "plain_std": float(plain.float().std()),
            "zero_vs_plain": diff(zero, plain),
            "zero_mixed": len(zero_mixers[0].mixed_steps),
            "on_vs_plain": diff(on, plain),
            "on_finite": bool(torch.isfinite(on).all()),
            "again_vs_plain": diff(again, plain),
            "flow": mixer.flow,
            "steps": mixer.n_steps,
            "handled": mixer.handled_steps,
            "mixed": mixer.mixed_steps,
            "sigmas": [float(s) for s in sched],
            # the mixer's noised reference at every step vs the host's own noise_scaling at that sigma
            "zprime_vs_host": max(diff(mixer.zprime(i), host_zprimes[i]) for i in range(mixer.n_steps)),
            # w = 1 at step 0: the mixed start is z'_0, which must be the host's own start state
            "w0": mixer.weights[0],
            "first_input_vs_plain": diff(on_den.inputs[0], plain_den.inputs[0]),
            "second_input_vs_plain": diff(on_den.inputs[1], plain_den.inputs[1]),
        }
    out["runs"] = runs
    rewind, _, rewind_mixers, _ = hires_pass(
        tiny, unet, pred, "sample_euler", z_up, noise, MixParams(alpha=1.0, rewind=True, order="iterative_mixer")
    )
    plain, _, _, _ = hires_pass(tiny, unet, pred, "sample_euler", z_up, noise, None)
    out["rewind_rounds"] = len(rewind_mixers)
    out["rewind_vs_plain"] = diff(rewind, plain)
    out["rewind_finite"] = bool(torch.isfinite(rewind).all())
    # a batch of 2 mixes each image with its own upscaled latent (row 0 has the single image's prompt and inputs)
    z2, n2 = torch.cat([z_up, z_up.flip(-1)]), torch.cat([noise, torch.randn(noise.shape, generator=g)])
    batched, _, _, _ = hires_pass(tiny, unet, pred, "sample_euler", z2, n2, MixParams(alpha=1.0), batch=2)
    single, _, _, _ = hires_pass(tiny, unet, pred, "sample_euler", z_up, noise, MixParams(alpha=1.0))
    out["batch_row_vs_single"] = diff(batched[:1], single)
    out["batch_rows_differ"] = diff(batched[:1], batched[1:])
    out["batch_finite"] = bool(torch.isfinite(batched).all())
    out["functions_restored"] = all(getattr(kd, n) is f for n, f in functions.items())
    out["model_options_unchanged"] = repr(sorted(unet.model_options)) == options_before
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
