"""Tiny Z-Image and Lumina 2: Neo's `backend.nn.lumina.NextDiT` with the layouts its detection gives each (Z-Image:
Z-Image modulation, time scale 1000, tokens padded to multiples of 32; Lumina 2: grouped-query attention)."""

from __future__ import annotations

import torch

from tests.e2e import tiny_dit as tb

CAP_DIM, CAP_LEN = 32, 12


def _cond(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, CAP_LEN, CAP_DIM, generator=g)


def host_span(model, x: torch.Tensor, cond) -> tuple[int, int]:
    """NextDiT's own caption length (`patchify_and_embed` returns it) and image token count for one call."""
    seen = {}
    original = model.patchify_and_embed

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen["cap"], seen["size"] = out[3][0], out[2][0]
        return out

    model.patchify_and_embed = spy
    try:
        model(x, torch.full((x.shape[0],), 0.5), cond)
    finally:
        del model.patchify_and_embed
    (h, w), p = seen["size"], model.patch_size
    return seen["cap"], seen["cap"] + (h // p) * (w // p)


def zimage() -> tb.Tiny:
    from backend.nn.lumina import NextDiT

    torch.manual_seed(0)
    model = NextDiT(
        patch_size=2, in_channels=16, dim=256, n_layers=3, n_refiner_layers=1, n_heads=4, n_kv_heads=4,
        multiple_of=16, ffn_dim_multiplier=8.0 / 3.0, qk_norm=True, cap_feat_dim=CAP_DIM, axes_dims=[16, 24, 24],
        axes_lens=[64, 64, 64], rope_theta=256.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
    )  # fmt: skip
    return tb.Tiny("ZImage", tb.init_weights(model), 16, _cond, shift=3.0, host_span=host_span)


def lumina2() -> tb.Tiny:
    from backend.nn.lumina import NextDiT

    torch.manual_seed(0)
    model = NextDiT(
        patch_size=2, in_channels=16, dim=48, n_layers=3, n_refiner_layers=1, n_heads=2, n_kv_heads=1,
        multiple_of=16, ffn_dim_multiplier=4.0, qk_norm=True, cap_feat_dim=CAP_DIM, axes_dims=[8, 8, 8],
        axes_lens=[64, 64, 64], rope_theta=10000.0,
    )  # fmt: skip
    return tb.Tiny("Lumina2", tb.init_weights(model), 16, _cond, shift=6.0, host_span=host_span)


BUILDERS = {"zimage": zimage, "lumina2": lumina2}
