"""Tiny models of the families that are not Neo's newer DiTs (those are in tests/e2e/tiny_dits/): the SD UNets (SD1.5,
SD2.x, SDXL, the SDXL refiner, Mugen), Flux, Chroma and SD3, each built from the running host's own class with the
layout its checkpoints have (context width, ADM input, latent channels), shrunk.

`BUILDERS = {family_key: build_fn}`, like a tiny_dits module; kept apart because tests/e2e/refdrop_dit_check.py runs
over every tiny_dits builder and these families are not RefDrop's generic DiT sites. A builder imports the host's class
when it is called (from a script run with the host's python); which host has which family: `spec.families.HOSTS`.
"""

from __future__ import annotations

import inspect

import torch

from tests.e2e import tiny_dit as tb

TOKENS = 16  # prompt tokens of the tiny conditioning


class Cond(dict):
    """What the WebUI's `DictWithShape` offers the host's `compile_weighted_conditions` (SDXL, Flux, SD3 prompts)."""

    @property
    def shape(self):
        return self["crossattn"].shape

    def advanced_indexing(self, item):
        return Cond({k: v[item] for k, v in self.items()})


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _text(width: int, vector: int | None = None, guidance: bool = False):
    """(batch, seed) -> the engine's get_learned_conditioning output: a (B, TOKENS, width) tensor, or with a pooled
    `vector` (and Flux's distilled `guidance`) a Cond."""

    def cond(batch: int, seed: int):
        crossattn = _randn(seed, batch, TOKENS, width)
        if vector is None:
            return crossattn
        out = Cond(crossattn=crossattn, vector=_randn(seed + 1, batch, vector))
        if guidance:
            out["guidance"] = torch.full((batch,), 3.5)
        return out

    return cond


# --- the SD UNets ---------------------------------------------------------------------------------------------------
def _unet(engine: str, channels: int, context: int, adm: int | None = None, linear: bool = True) -> tb.Tiny:
    from backend.nn.unet import IntegratedUNet2DConditionModel as UNet

    torch.manual_seed(0)
    model = UNet(
        in_channels=channels, model_channels=32, out_channels=channels, num_res_blocks=1, channel_mult=(1, 2),
        num_head_channels=16, use_spatial_transformer=True, transformer_depth=[1, 1], transformer_depth_middle=1,
        transformer_depth_output=[1, 1, 1, 1], context_dim=context, use_linear_in_transformer=linear,
        num_classes="sequential" if adm else None, adm_in_channels=adm,
    )  # fmt: skip
    return tb.Tiny(engine, tb.init_weights(model), channels, _text(context, adm))


def sd15() -> tb.Tiny:
    return _unet("StableDiffusion", 4, 768, linear=False)


def sd2() -> tb.Tiny:
    return _unet("StableDiffusion2", 4, 1024)


def sdxl() -> tb.Tiny:
    return _unet("StableDiffusionXL", 4, 2048, adm=2816)


def sdxl_refiner() -> tb.Tiny:
    return _unet("StableDiffusionXLRefiner", 4, 1280, adm=2560)


def mugen() -> tb.Tiny:
    return _unet("Mugen", 32, 2048, adm=2816)  # SDXL's UNet on Flux.2's 32-channel latent


# --- Flux, Chroma, SD3 ----------------------------------------------------------------------------------------------
def flux() -> tb.Tiny:
    import backend.nn.flux as fluxmod

    torch.manual_seed(0)
    shape = dict(
        in_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=64, mlp_ratio=4, num_heads=2, depth=1,
        depth_single_blocks=1, axes_dim=[4, 14, 14], theta=10000, qkv_bias=True, guidance_embed=True,
    )  # fmt: skip
    if "out_channels" in inspect.signature(fluxmod.IntegratedFluxTransformer2DModel).parameters:
        shape.update(out_channels=16, patch_size=2)  # Neo: per-patch channels and the patch size are arguments
    model = fluxmod.IntegratedFluxTransformer2DModel(**shape)
    return tb.Tiny("Flux", tb.init_weights(model), 16, _text(4096, 768, guidance=True))


def chroma() -> tb.Tiny:
    from backend.nn.chroma import IntegratedChromaTransformer2DModel as Chroma

    torch.manual_seed(0)
    common = dict(context_in_dim=4096, hidden_size=64, mlp_ratio=4, num_heads=2, axes_dim=[4, 14, 14], theta=10000)
    if "kwargs" in inspect.signature(Chroma).parameters:  # Neo: a ChromaParams; its modulation table needs 19 + 38
        model = Chroma(
            **common, in_channels=64, out_channels=64, depth=19, depth_single_blocks=38, patch_size=2,
            qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=32, n_layers=1, txt_ids_dims=[], vec_in_dim=768,
        )  # fmt: skip
    else:
        model = Chroma(
            **common, in_channels=16, vec_in_dim=768, depth=1, depth_single_blocks=1, qkv_bias=True,
            guidance_out_dim=64, guidance_hidden_dim=32, guidance_n_layers=1,
        )  # fmt: skip
    return tb.Tiny("Chroma", tb.init_weights(model), 16, _text(4096))


def sd3() -> tb.Tiny:
    from backend.nn.mmditx import MMDiTX

    torch.manual_seed(0)
    model = MMDiTX(
        patch_size=2, in_channels=16, depth=2, adm_in_channels=2048, pos_embed_max_size=16, num_patches=256,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    )  # fmt: skip
    return tb.Tiny("StableDiffusion3", tb.init_weights(model), 16, _text(4096, 2048))


BUILDERS = {
    "sd15": sd15,
    "sd2": sd2,
    "sdxl": sdxl,
    "sdxl_refiner": sdxl_refiner,
    "mugen": mugen,
    "flux": flux,
    "chroma": chroma,
    "sd3": sd3,
}
