"""Tiny Anima: Neo's `backend.nn.anima.Anima` with the layout its detection gives (`huggingface_guess` detection:
patch 2 × 1, padding-mask channel, 3-D RoPE with h/w extrapolation 4), scaled down. Neo's Anima engine generates
images as 5-D latents of one frame (it uses the Wan VAE, `is_wan`), and its conditioning reaches the model as
(B, 1, 512, 1024): the text engine returns one (1, 512, 1024) tensor per prompt, which the prompt parser stacks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tests.e2e import tiny_dit as tb

CAP_DIM, CAP_LEN = 32, 12


def _cond(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, CAP_LEN, CAP_DIM, generator=g)


def host_span(model, x: torch.Tensor, cond) -> tuple[int, int]:
    """The image tokens of one call from Anima's own patch grid (its `x_embedder` output, (B, T, H, W, D)): the
    frames of the model's input come first (its output keeps those; patch_temporal is 1), appended reference frames
    after them."""
    seen = {}
    hook = model.x_embedder.register_forward_hook(lambda _m, _a, out: seen.__setitem__("grid", out.shape[1:4]))
    try:
        model(x, torch.full((x.shape[0],), 0.5), cond)
    finally:
        hook.remove()
    _t, h, w = seen["grid"]
    return 0, x.shape[2] * h * w


@contextmanager
def reference_latent(x: torch.Tensor) -> Iterator[None]:
    """Neo's "Anima reference" (option `anima_do_reference`): the encoded image in `dynamic_args.ref_latents`, which
    the model appends to its input's frames."""
    from backend.args import dynamic_args

    g = torch.Generator().manual_seed(77)
    before = dynamic_args.ref_latents
    dynamic_args.ref_latents = [torch.randn((1, *x.shape[1:]), generator=g).to(x.dtype)]
    try:
        yield
    finally:
        dynamic_args.ref_latents = before


def anima() -> tb.Tiny:
    from backend.nn.anima import Anima

    torch.manual_seed(0)
    model = Anima(
        in_channels=16, out_channels=16, patch_spatial=2, patch_temporal=1, model_channels=64,
        concat_padding_mask=True, crossattn_emb_channels=CAP_DIM, adaln_lora_dim=16, num_blocks=3, num_heads=2,
        rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0, rope_t_extrapolation_ratio=1.0,
        mlp_ratio=2.0,
    )  # fmt: skip
    return tb.Tiny(
        "Anima", tb.init_weights(model), 16, _cond, frames=1, shift=3.0, host_span=host_span,
        engine_attrs={"is_wan": True}, extra_tokens=reference_latent,
    )  # fmt: skip


BUILDERS = {"anima": anima}
