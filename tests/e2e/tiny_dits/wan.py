"""Tiny Wan 2.1 text-to-video: Neo's `backend.nn.wan.WanModel` with the layout its detection gives (patch 1 × 2 × 2,
q/k norms, cross-attention norm), scaled down. Neo's Wan engine uses the Wan VAE (`is_wan`): its latents are
(B, C, T, H, W), one frame for an image, and its UMT5 conditioning is (B, tokens, 4096)."""

from __future__ import annotations

import torch

from tests.e2e import tiny_dit as tb

CAP_DIM, CAP_LEN = 32, 12


def _cond(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, CAP_LEN, CAP_DIM, generator=g)


def host_span(model, x: torch.Tensor, cond) -> tuple[int, int]:
    """The video tokens of one call from Wan's own patch grid (its `patch_embedding` output, (B, dim, T, H, W))."""
    seen = {}
    hook = model.patch_embedding.register_forward_hook(lambda _m, _a, out: seen.__setitem__("grid", out.shape[2:]))
    try:
        model(x, torch.full((x.shape[0],), 500.0), cond)
    finally:
        hook.remove()
    t, h, w = seen["grid"]
    return 0, t * h * w


def wan() -> tb.Tiny:
    from backend.nn.wan import WanModel

    torch.manual_seed(0)
    model = WanModel(
        model_type="t2v", patch_size=(1, 2, 2), text_len=CAP_LEN, in_dim=16, dim=64, ffn_dim=128, freq_dim=32,
        text_dim=CAP_DIM, out_dim=16, num_heads=2, num_layers=3, qk_norm=True, cross_attn_norm=True, eps=1e-6,
    )  # fmt: skip
    tb.init_weights(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the host allocates its modulation tables with torch.empty
        for name, prm in model.named_parameters():
            if name.endswith("modulation"):
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.1)
    return tb.Tiny(
        "Wan", model, 16, _cond, frames=1, shift=8.0, multiplier=1000.0, host_span=host_span,
        engine_attrs={"is_wan": True}, clip_frames=3,
    )  # fmt: skip


BUILDERS = {"wan": wan}
