"""Tiny Flux.2 (Klein): Neo's `IntegratedFluxTransformer2DModel` with the layout its detection gives Flux.2 (global
modulation, SiLU-gated MLPs, no biases, 4 RoPE axes with text positions on the last, 1×1 patches over a 128-channel
latent at 1/16 of the image), as an edit: the engine's `get_learned_conditioning` puts the img2img input image in
`dynamic_args.ref_latents` (set here once; every check runs in its own process), whose tokens follow the generated
image's in every attention call. There is no `host.sites` entry: RefDrop runs through Flux's own path."""

from __future__ import annotations

import torch

from tests.e2e import tiny_dit as tb

TXT_DIM, TXT_LEN = 32, 12


def _cond(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TXT_LEN, TXT_DIM, generator=g)


def host_span(model, x: torch.Tensor, cond) -> tuple[int, int]:
    """The text length (the context's) and the generated image's token count (the first `process_img` of the call,
    before the edit's reference latents are appended)."""
    seen = []
    original = model.process_img

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out[0].shape[1])
        return out

    model.process_img = spy
    try:
        model(x, torch.full((x.shape[0],), 0.5), cond)
    finally:
        del model.process_img
    return cond.shape[1], cond.shape[1] + seen[0]


def flux2() -> tb.Tiny:
    from backend.args import dynamic_args
    from backend.nn.flux import IntegratedFluxTransformer2DModel

    torch.manual_seed(0)
    model = IntegratedFluxTransformer2DModel(
        in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=TXT_DIM, hidden_size=64, mlp_ratio=3.0,
        num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 8, 8, 8], theta=2000, patch_size=1,
        qkv_bias=False, guidance_embed=False, txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True,
        ops_bias=False, default_ref_method="index", ref_index_scale=10.0,
    )  # fmt: skip
    tb.init_weights(model)
    g = torch.Generator().manual_seed(1)
    dynamic_args.ref_latents = [torch.randn(1, 128, 3, 5, generator=g)]  # an edit's input image, 48×80 px
    return tb.Tiny("Flux2", model, 128, _cond, shift=2.02, downscale=16, host_span=host_span)


BUILDERS = {"flux2": flux2}
