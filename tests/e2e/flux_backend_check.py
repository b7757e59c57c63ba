"""Redux glue through Forge's own Flux backend on the CPU; run with Forge's python from Forge's folder.

    cd $IMGCOND_FORGE_DIR && $IMGCOND_FORGE_PYTHON <repo>/tests/e2e/flux_backend_check.py [--dtype float32|float64]

Works with Forge 2.0 and Forge Neo (their constructors, predictor and KModel differ; see `build_unet`).
A tiny `IntegratedFluxTransformer2DModel` (random weights) is wrapped by Forge's `UnetPatcher` and driven through
Forge's `sampling_function`, with this extension's `plan` (tiny SigLIP + Redux files in a temporary models folder)
and `install` on a patcher clone, as `process` / `process_before_every_sampling` do. Prints one JSON object of
measurements; tests/e2e/test_redux_flux_backend.py asserts on them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
FORGE = Path.cwd()
sys.argv = [sys.argv[0], *sys.argv[1:]]
_cli = argparse.ArgumentParser()
_cli.add_argument("--dtype", default="float32", choices=("float32", "float64"))
_cli.add_argument("--model", default="flux", choices=("flux", "chroma"))
_cli.add_argument("--depth", type=int, default=1, help="double and single blocks of the tiny Flux")
OPTS = _cli.parse_args()
NEO = (FORGE / "modules_forge" / "packages").is_dir()  # Forge Neo vendors its packages there
sys.argv = [sys.argv[0], "--cpu" if NEO else "--always-cpu"]  # the backend reads its flags from sys.argv at import
for extra in (REPO, FORGE, FORGE / "packages_3rdparty", FORGE / "modules_forge" / "packages"):
    sys.path.insert(0, str(extra))
sys.path.insert(0, str(FORGE / "repositories" / "huggingface_guess"))

import inspect  # noqa: E402

import backend.nn.flux as fluxmod  # noqa: E402
import torch  # noqa: E402
from backend import args as backend_args  # noqa: E402
from backend import memory_management as mm  # noqa: E402
from backend.modules.k_prediction import PredictionFlux  # noqa: E402
from backend.patcher.unet import UnetPatcher  # noqa: E402
from backend.sampling.sampling_function import sampling_function, sampling_prepare  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lib_imgcond.common import errors as imgcond_errors  # noqa: E402
from lib_imgcond.host import capabilities as webui  # noqa: E402
from lib_imgcond.host import flux_attention, forge  # noqa: E402
from lib_imgcond.redux import forge_bias as redux_bias  # noqa: E402
from lib_imgcond.redux import forge_files  # noqa: E402
from lib_imgcond.redux import forge_redux as host  # noqa: E402
from lib_imgcond.redux.projector import ReduxProjector  # noqa: E402
from lib_imgcond.redux.spec import SPEC  # noqa: E402
from lib_imgcond.spec.params import ImageInput  # noqa: E402
from lib_imgcond.vision.config import VisionConfig  # noqa: E402
from lib_imgcond.vision.transformer import VisionTransformer  # noqa: E402

DTYPE = getattr(torch, OPTS.dtype)
T5_LEN = 256


# --- the tiny model ---------------------------------------------------------------------------------------------------
def build_flux() -> torch.nn.Module:
    shape = dict(
        in_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=64, mlp_ratio=4, num_heads=2, depth=OPTS.depth,
        depth_single_blocks=OPTS.depth, axes_dim=[4, 14, 14], theta=10000, qkv_bias=True, guidance_embed=True,
    )  # fmt: skip
    if "out_channels" in inspect.signature(fluxmod.IntegratedFluxTransformer2DModel).parameters:
        shape.update(out_channels=16, patch_size=2)  # Neo: per-patch channels and the patch size are arguments
    return fluxmod.IntegratedFluxTransformer2DModel(**shape)


def build_chroma() -> torch.nn.Module:
    from backend.nn.chroma import IntegratedChromaTransformer2DModel as Chroma

    common = dict(context_in_dim=4096, hidden_size=64, mlp_ratio=4, num_heads=2, axes_dim=[4, 14, 14], theta=10000)
    if "kwargs" in inspect.signature(Chroma).parameters:  # Neo: a ChromaParams; its modulation table needs 19 + 38
        return Chroma(
            **common, in_channels=64, out_channels=64, depth=19, depth_single_blocks=38, patch_size=2,
            qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=32, n_layers=1, txt_ids_dims=[], vec_in_dim=768,
        )  # fmt: skip
    return Chroma(
        **common, in_channels=16, vec_in_dim=768, depth=OPTS.depth, depth_single_blocks=OPTS.depth, qkv_bias=True,
        guidance_out_dim=64, guidance_hidden_dim=32, guidance_n_layers=1,
    )  # fmt: skip


def build_unet() -> UnetPatcher:
    torch.manual_seed(0)
    model = build_chroma() if OPTS.model == "chroma" else build_flux()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0.0, mod.in_features**-0.5)
                if mod.bias is not None:
                    mod.bias.normal_(0.0, 0.02)
    model = model.to(DTYPE).eval().requires_grad_(False)
    model.storage_dtype = model.computation_dtype = DTYPE
    model.load_device = mm.get_torch_device()
    model.initial_device = torch.device("cpu")
    model.offload_device = mm.unet_offload_device()
    if "model_config" in inspect.signature(PredictionFlux).parameters:  # Neo: the shift comes from a model config
        pred = PredictionFlux(SimpleNamespace(sampling_settings={"shift": 1.15}))
        backend_args.dynamic_args.ops = "ForgeOperations"  # what Neo's loader sets before building a KModel
        config = SimpleNamespace(memory_usage_factor=1.0)
    else:
        pred = PredictionFlux(seq_len=4096, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15)
        config = None
    return UnetPatcher.from_model(model=model, diffusers_scheduler=None, k_predictor=pred, config=config)


class Cond(dict):
    """What `modules.prompt_parser.DictWithShape` offers `compile_weighted_conditions`."""

    @property
    def shape(self):
        return self["crossattn"].shape

    def advanced_indexing(self, item):
        return Cond({k: v[item] for k, v in self.items()})


def conds(batch: int, seed: int):
    """Flux: T5 tokens, pooled CLIP vector, distilled guidance; Chroma: the T5 tokens alone, as a tensor (what its
    engine's get_learned_conditioning returns)."""
    g = torch.Generator().manual_seed(seed)
    crossattn = torch.randn(batch, T5_LEN, 4096, generator=g)
    if OPTS.model == "chroma":
        return crossattn
    return Cond(crossattn=crossattn, vector=torch.randn(batch, 768, generator=g), guidance=torch.full((batch,), 3.5))


def t5(cond) -> torch.Tensor:
    return cond if isinstance(cond, torch.Tensor) else cond["crossattn"]


class Engine:
    def __init__(self, unet):
        self.forge_objects = SimpleNamespace(unet=unet)


# the family check looks at the engine's class name, as Forge's engines are named
Flux = type("Chroma" if OPTS.model == "chroma" else "Flux", (Engine,), {})
SWAP: dict = {}  # the module whose `attention` the model's blocks call, and that function as it was


# --- tiny model files -------------------------------------------------------------------------------------------------
def write_models(root: Path) -> None:
    torch.manual_seed(1)
    cfg = VisionConfig("siglip", 32, 2, 1, 64, 384, 14, None, "gelu_tanh", "tiny")
    vision = VisionTransformer(cfg)
    for prm in vision.parameters():
        torch.nn.init.normal_(prm, 0.0, 0.05)
    (root / "imgcond" / "siglip").mkdir(parents=True)
    (root / "imgcond" / "redux").mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in vision.state_dict().items()}, root / "imgcond/siglip/tiny-siglip.safetensors"
    )
    clip = VisionTransformer(VisionConfig("clip", 32, 1, 1, 64, 224, 14, 16, "gelu", "tiny-clip"))
    for prm in clip.parameters():
        torch.nn.init.normal_(prm, 0.0, 0.05)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, root / "imgcond/siglip/tiny-clip.safetensors")
    proj = ReduxProjector(32, 64, 4096)
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()}, root / "imgcond/redux/tiny-redux.safetensors")


def picture(seed: int, w: int = 96, h: int = 64):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# --- driving Forge's sampling function --------------------------------------------------------------------------------
class Recorder:
    """Forward pre-hook on the diffusion model: the context of every call, whether the Redux bias is on for it, and
    whether the module's attention function is swapped during it (Forge 2.0's mechanism; never on Neo)."""

    def __init__(self, model, state=None):
        self.calls = []
        self.state = state
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, _module, args, kwargs):
        ctx = kwargs.get("context")
        self.calls.append(
            {
                "context": ctx.detach().clone(),
                "patched": self.state is not None and self.state.call is not None,
                "swapped": SWAP["module"].attention is not SWAP["original"],
            }
        )


def run(unet, batch: int, cfg: float, sigma: float, values: dict | None, steps: int = 1):
    """One (or `steps` Euler) denoiser evaluation(s) through sampling_function; returns outputs and the recorder."""
    job = host.plan(SimpleNamespace(sd_model=Flux(unet)), values) if values is not None else None
    pass_unet = unet.clone()
    state = host.install(pass_unet, job) if job is not None else None
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 16, 8, 8, generator=g)
    cond, uncond = conds(batch, 10), conds(batch, 20) if cfg != 1.0 else None
    denoiser = SimpleNamespace(
        inner_model=SimpleNamespace(inner_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=pass_unet))),
        p=SimpleNamespace(seeds=[1]),
    )
    rec = Recorder(unet.model.diffusion_model, state)
    sampling_prepare(pass_unet, x)
    sigmas = torch.linspace(sigma, 0.0, steps + 1)
    outs = []
    try:
        for i in range(steps):
            params = SimpleNamespace(
                x=x, sigma=sigmas[i].repeat(batch), text_cond=cond, text_uncond=uncond, image_cond=None
            )
            composition = [[(row, 1.0)] for row in range(batch)]
            den, cpred, upred = sampling_function(denoiser, params, cfg, composition)
            outs.append((den, cpred, upred))
            x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    finally:
        rec.handle.remove()
    return {"denoised": outs[0][0], "cond": outs[0][1], "uncond": outs[0][2], "final": x}, rec, job, cond


def diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def main() -> None:
    out: dict = {"dtype": OPTS.dtype, "host": webui.capabilities().name, "model": OPTS.model}
    tmp = Path(tempfile.mkdtemp(prefix="imgcond-redux-"))
    write_models(tmp)
    forge.models_dir = lambda *parts: str(tmp.joinpath(*parts))
    unet = build_unet()
    SWAP["module"] = sys.modules[flux_attention.swap_module(unet.model.diffusion_model)]
    SWAP["original"] = SWAP["module"].attention
    out["swap_module"] = SWAP["module"].__name__
    p = SimpleNamespace(sd_model=Flux(unet))

    def values(**kw):
        v = SPEC.parse([{"image1": ImageInput(picture(1)), **kw}])
        return v

    # 1. context growth: medium preset = 81 tokens, and two images (81 + 25 at lowest) in order
    base, rec0, _, _ = run(unet, 1, 1.0, 0.8, None)
    one, rec1, job1, _ = run(unet, 1, 1.0, 0.8, values())
    out["tokens_medium"] = job1.count
    out["ctx_off"] = [c["context"].shape[1] for c in rec0.calls]
    out["ctx_medium"] = [c["context"].shape[1] for c in rec1.calls]
    out["medium_vs_off"] = diff(one["denoised"], base["denoised"])
    two_values = values(image2=ImageInput(picture(2, 50, 80)), control2="lowest", strength2=0.5)
    _, rec2, job2, _ = run(unet, 1, 1.0, 0.8, two_values)
    ctx = rec2.calls[0]["context"]
    out["ctx_two"] = int(ctx.shape[1])
    out["two_order_ok"] = bool(
        torch.equal(ctx[:, T5_LEN:], job2.tokens.to(ctx.dtype)) and torch.equal(job2.tokens[:, :81], job1.tokens)
    )
    # 2. batch 2: every row keeps its own prompt, then the same Redux tokens
    _, recb, _, cb = run(unet, 2, 1.0, 0.8, values())
    ctxb = recb.calls[0]["context"]
    out["batch_rows_ok"] = bool(
        ctxb.shape == (2, T5_LEN + 81, 4096)
        and torch.equal(ctxb[:, :T5_LEN], t5(cb).to(ctxb.dtype))
        and torch.equal(ctxb[0, T5_LEN:], ctxb[1, T5_LEN:])
    )
    # 3. attention bias: strength 0 equals Redux off; strength 1 equals multiply strength 1
    s0, rec_s0, _, _ = run(unet, 1, 1.0, 0.8, values(strength_type1="attn_bias", strength1=0.0), steps=3)
    off3, _, _, _ = run(unet, 1, 1.0, 0.8, None, steps=3)
    out["bias0_vs_off"] = diff(s0["final"], off3["final"])
    out["bias0_patched_calls"] = sum(c["patched"] for c in rec_s0.calls)
    out["bias0_swapped_calls"] = sum(c["swapped"] for c in rec_s0.calls)
    out["bias0_ctx"] = [c["context"].shape[1] for c in rec_s0.calls]
    mul1, _, _, _ = run(unet, 1, 1.0, 0.8, values(strength1=1.0), steps=3)
    b1, rec_b1, _, _ = run(unet, 1, 1.0, 0.8, values(strength_type1="attn_bias", strength1=1.0), steps=3)
    out["bias1_vs_multiply1"] = diff(b1["final"], mul1["final"])
    out["bias1_patched_calls"] = sum(c["patched"] for c in rec_b1.calls)
    # the patched SDPA path itself at strength 1 (forced), against the unpatched append
    job_forced = host.plan(p, values(strength_type1="attn_bias", strength1=1.0))
    forced = unet.clone()
    redux_bias.install(forced, job_forced, host.install(forced, job_forced))
    out["bias1_forced_vs_multiply1"] = _forced_diff(forced, mul1)
    half, _, _, _ = run(unet, 1, 1.0, 0.8, values(strength_type1="attn_bias", strength1=0.5))
    out["bias_half_vs_off"] = diff(half["denoised"], base["denoised"])
    out["bias_half_vs_full"] = diff(half["denoised"], one["denoised"])
    # mixed: image 1 multiply, image 2 attn_bias 0 ⇒ same as image 1 alone
    mixed_values = values(image2=ImageInput(picture(2)), strength_type2="attn_bias", strength2=0.0)
    mixed, _, _, _ = run(unet, 1, 1.0, 0.8, mixed_values)
    out["mixed_bias0_vs_image1"] = diff(mixed["denoised"], one["denoised"])
    # 4. CFG > 1: the uncond prediction is the one without Redux, also for lengths Forge would repeat (256 tokens)
    cfg_off, rec_co, _, _ = run(unet, 1, 3.5, 0.8, None)
    for name, kw in (("medium", {}), ("n256", {"control1": "advanced", "factor1": 1.7, "interpolation1": "area"})):
        cfg_on, rec_cn, jobc, _ = run(unet, 1, 3.5, 0.8, values(**kw))
        out[f"cfg_{name}_tokens"] = jobc.count
        out[f"cfg_{name}_uncond_diff"] = diff(cfg_on["uncond"], cfg_off["uncond"])
        out[f"cfg_{name}_cond_diff"] = diff(cfg_on["cond"], cfg_off["cond"])
        out[f"cfg_{name}_ctx"] = sorted(c["context"].shape[1] for c in rec_cn.calls)
    out["cfg_off_ctx"] = sorted(c["context"].shape[1] for c in rec_co.calls)
    cfg_b0, _, _, _ = run(unet, 1, 3.5, 0.8, values(strength_type1="attn_bias", strength1=0.0))
    out["cfg_bias0_vs_off"] = diff(cfg_b0["denoised"], cfg_off["denoised"])
    cfg_b0n, _, _, _ = run(unet, 1, 3.5, 0.8, values(strength_type1="attn_bias", strength1=0.3))
    out["cfg_bias_uncond_diff"] = diff(cfg_b0n["uncond"], cfg_off["uncond"])
    # 5. step window: inactive outside [start, end]
    early, _, _, _ = run(unet, 1, 1.0, 0.8, values(start=0.5))
    out["window_inactive_vs_off"] = diff(early["denoised"], base["denoised"])
    late, _, _, _ = run(unet, 1, 1.0, 0.3, values(start=0.5))
    late_off, _, _, _ = run(unet, 1, 1.0, 0.3, None)
    out["window_active_vs_off"] = diff(late["denoised"], late_off["denoised"])
    # 6. errors and the restored module global
    out["attention_restored"] = SWAP["module"].attention is SWAP["original"]
    # 7. the encoders live in the host's model management: its ModelPatcher, among its loaded models after a job
    _, dtype = forge_files.compute_device_dtype()
    managed = [forge_files.load_model(k, forge_files.resolve(k, ""), dtype) for k in ("siglip", "redux")]
    loaded = [lm.model for lm in mm.current_loaded_models]
    out["managed"] = {
        "capability": webui.capabilities().model_management,
        "full_load_flag": webui.capabilities().full_load_flag,
        "patchers": [f"{type(m.patcher).__module__}.{type(m.patcher).__name__}" for m in managed],
        "loaded": [any(x is m.patcher for x in loaded) for m in managed],
    }
    errors = {}
    for label, kw in (
        ("empty_mask", {"mask1": ImageInput(picture(0).point(lambda _: 0))}),
        ("mask_size", {"mask1": ImageInput(picture(3, 40, 40))}),
        ("wrong_siglip", {"siglip": "tiny-redux.safetensors"}),
        ("clip_as_siglip", {"siglip": "tiny-clip.safetensors"}),
        ("redux_as_siglip_slot", {"redux_model": "tiny-siglip.safetensors"}),
        ("missing", {"redux_model": "nope.safetensors"}),
    ):
        if label == "wrong_siglip":
            shutil.copy(tmp / "imgcond/redux/tiny-redux.safetensors", tmp / "imgcond/siglip/tiny-redux.safetensors")
            shutil.copy(tmp / "imgcond/siglip/tiny-siglip.safetensors", tmp / "imgcond/redux/tiny-siglip.safetensors")
        try:
            host.plan(p, values(**kw))
            errors[label] = None
        except imgcond_errors.ImgcondError as e:
            errors[label] = str(e)
    out["errors"] = errors
    out["cuda_initialized"] = torch.cuda.is_initialized()
    shutil.rmtree(tmp, ignore_errors=True)
    print("RESULT " + json.dumps(out))


def _forced_diff(forced_unet, reference) -> float:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 8, 8, generator=g)
    cond = conds(1, 10)
    denoiser = SimpleNamespace(
        inner_model=SimpleNamespace(inner_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=forced_unet))),
        p=SimpleNamespace(seeds=[1]),
    )
    sampling_prepare(forced_unet, x)
    sigmas = torch.linspace(0.8, 0.0, 4)
    for i in range(3):
        params = SimpleNamespace(x=x, sigma=sigmas[i].repeat(1), text_cond=cond, text_uncond=None, image_cond=None)
        den, _, _ = sampling_function(denoiser, params, 1.0, [[(0, 1.0)]])
        x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return diff(x, reference["final"])


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    main()
