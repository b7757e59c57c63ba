"""Tiny ERNIE-Image: Neo's `backend.nn.ernie.ErnieImageModel`, fed as Neo's ErnieImage engine feeds it: a Flux.2
latent (B, 128, H/16, W/16) with patch 1, a prompt of (B, tokens, text width), timesteps of sigma × 1000."""

from __future__ import annotations

import torch

from tests.e2e import tiny_dit as tb

TEXT_DIM, CAP_LEN = 48, 12


def _cond(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, CAP_LEN, TEXT_DIM, generator=g)


def host_span(model, x: torch.Tensor, cond) -> tuple[int, int]:
    """The host's own intermediates of one call: its patch embedding's tokens, and where they sit in the sequence the
    first layer gets (image and prompt joined by the host)."""
    seen: dict = {}

    def grab(name):
        def hook(_module, args, out):
            seen.setdefault(name, (args, out))  # returns None: the output passes unchanged

        return hook

    hooks = [model.x_embedder.register_forward_hook(grab("img")), model.layers[0].register_forward_hook(grab("layer"))]
    try:
        model(x, torch.full((x.shape[0],), 500.0), cond)
    finally:
        for hook in hooks:
            hook.remove()
    image, joined = seen["img"][1], seen["layer"][0][0]
    start = next(i for i in range(joined.shape[1] - image.shape[1] + 1)
                 if torch.equal(joined[:, i : i + image.shape[1]], image))  # fmt: skip
    return start, start + image.shape[1]


def ernie_image() -> tb.Tiny:
    from backend.nn.ernie import ErnieImageModel

    torch.manual_seed(0)
    model = ErnieImageModel(
        hidden_size=64, num_attention_heads=2, num_layers=3, ffn_hidden_size=128, in_channels=128, out_channels=128,
        patch_size=1, text_in_dim=TEXT_DIM, rope_theta=256, rope_axes_dim=(8, 12, 12),
    )  # fmt: skip
    return tb.Tiny("ErnieImage", tb.init_weights(model), 128, _cond, shift=3.0, host_span=host_span,
                   multiplier=1000.0, downscale=16)  # fmt: skip


BUILDERS = {"ernie_image": ernie_image}
