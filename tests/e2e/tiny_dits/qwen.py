"""Tiny Qwen-Image: Neo's `backend.nn.qwen.QwenImageTransformer2DModel` (few blocks, small widths; RoPE axes summing to
the head dim), with the Qwen2.5-VL-shaped conditioning the engine gives it (a bare (B, tokens, dim) tensor, no mask).
Its latent is the Wan VAE's (B, 16, 1, H, W). Qwen-Image-Edit's reference latents reach the model through the
engine's `dynamic_args.ref_latents` (`edit`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tests.e2e import tiny_dit as tb

CAP_DIM, CAP_LEN = 32, 11


def _cond(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, CAP_LEN, CAP_DIM, generator=g)


def host_span(model, x: torch.Tensor, cond) -> tuple[int, int]:
    """The model's own text stream length (what `txt_in` gives the blocks) and its own count of the generated image's
    tokens (the first `process_img` of a call patchifies the latent; edit references come after)."""
    seen: dict = {}
    original = model.process_img

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.setdefault("image", out[0].shape[1])
        return out

    def text(_module, _args, out) -> None:
        seen.setdefault("text", out.shape[1])

    hook = model.txt_in.register_forward_hook(text)
    model.process_img = spy
    try:
        model(x, torch.full((x.shape[0],), 0.5), cond)
    finally:
        del model.process_img
        hook.remove()
    return seen["text"], seen["text"] + seen["image"]


@contextmanager
def edit(latents: list[torch.Tensor]) -> Iterator[None]:
    """Model calls carry `latents` as Qwen-Image-Edit references, as the engine's `get_learned_conditioning` sets
    them (`dynamic_args.ref_latents`, read by the model's forward when no `ref_latents` is passed)."""
    from backend.args import dynamic_args

    before = dynamic_args.ref_latents
    dynamic_args.ref_latents = list(latents)
    try:
        yield
    finally:
        dynamic_args.ref_latents = before


def split_output(output, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's `attn` returns (image stream, text stream): the image stream's first n tokens are the generated
    image's, the rest the edit references'."""
    img, txt = output
    return img[:, :n], torch.cat((img[:, n:], txt), dim=1)


def qwen_image() -> tb.Tiny:
    from backend.nn.qwen import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=CAP_DIM, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    return tb.Tiny("QwenImage", tb.init_weights(model), 16, _cond, frames=1, shift=3.0, host_span=host_span,
                   edit=edit, split_output=split_output)  # fmt: skip


BUILDERS = {"qwen_image": qwen_image}
