"""Tiny Krea 2: Neo's `backend.nn.krea.SingleStreamDiT` (grouped-query attention, a text-fusion stack over a fused
multi-layer text feature), fed as Neo's Krea2 engine feeds it: a Wan-style latent (B, 16, 1, H/8, W/8) and a prompt
of (B, 1, tokens, text layers × text width). `krea2_refs`: the same model with reference latents in every model call
(the host's `_forward_with_refs`: their tokens follow the image's)."""

from __future__ import annotations

import torch

from tests.e2e import tiny_dit as tb

TXT_LAYERS, TXT_DIM, CAP_LEN = 3, 32, 12


def _cond(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, CAP_LEN, TXT_LAYERS * TXT_DIM, generator=g)


def _refs(batch: int) -> dict:
    """One reference latent of another size than the image (3×5 tokens), as the engine keeps them: (1, C, 1, h, w)."""
    g = torch.Generator().manual_seed(77)
    return {"ref_latents": [torch.randn(1, 16, 1, 6, 10, generator=g)]}


def _host_span(extra):
    def host_span(model, x: torch.Tensor, cond) -> tuple[int, int]:
        """The host's own intermediates of one call: the fused prompt's length (`txtmlp`'s output), the image tokens
        (`first`'s output without references; with them the `split` the host gives each block)."""
        from backend.nn import krea

        seen: dict = {}

        def length(name):
            def hook(_module, _args, out):
                seen.setdefault(name, out.shape[1])  # returns None: the output passes unchanged

            return hook

        hooks = [model.txtmlp.register_forward_hook(length("txt")), model.first.register_forward_hook(length("img"))]
        original = krea._block_ref_forward

        def spy(block, x_, vec, refvec, split, *rest, **kw):
            seen.setdefault("split", split)
            return original(block, x_, vec, refvec, split, *rest, **kw)

        krea._block_ref_forward = spy
        try:
            model(x, torch.full((x.shape[0],), 0.5), cond, **extra(x.shape[0]))
        finally:
            krea._block_ref_forward = original
            for hook in hooks:
                hook.remove()
        return seen["txt"], seen.get("split", seen["txt"] + seen["img"])

    return host_span


def _build(call_kwargs=None) -> tb.Tiny:
    from backend.nn.krea import SingleStreamDiT

    torch.manual_seed(0)
    model = SingleStreamDiT(
        features=128, tdim=64, txtdim=TXT_DIM, heads=2, kvheads=1, multiplier=2, layers=3, patch=2, channels=16,
        theta=1000.0, txtlayers=TXT_LAYERS, txtheads=2, txtkvheads=2,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the modulation offsets are left uninitialised (torch.empty) by the class
        for name, prm in model.named_parameters():
            if name.endswith(".lin"):
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.1)
    extra = call_kwargs or (lambda _batch: {})
    return tb.Tiny("Krea2", tb.init_weights(model), 16, _cond, frames=1, shift=1.15, host_span=_host_span(extra),
                   call_kwargs=call_kwargs, refused_frames=2)  # fmt: skip


def krea2() -> tb.Tiny:
    return _build()


def krea2_refs() -> tb.Tiny:
    return _build(_refs)


BUILDERS = {"krea2": krea2, "krea2_refs": krea2_refs}
