"""Tiny PiD: Neo's `backend.nn.pixeldit.pid.PidNet` (a pixel-space `PixDiT_T2I`: joint-attention patch blocks, then
pixel blocks attending the image patches), 16-pixel patches as Neo's PiD has, sampled in pixel space.

Its engine's conditioning: the text encoder's tokens (`get_learned_conditioning`), and the low-quality latent with
its degrade sigma that PiD's processing puts in `dynamic_args.lq_latent` before sampling (set here once; every
check runs in its own process)."""

from __future__ import annotations

import torch

from tests.e2e import tiny_dit as tb

TXT_DIM, TXT_LEN = 32, 12


def _cond(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TXT_LEN, TXT_DIM, generator=g)


def host_span(model, x: torch.Tensor, cond) -> tuple[int, int]:
    """The text and image token counts the first patch block's joint attention receives (its `x` and `y`), in the
    order its concatenation puts them ([text; image])."""
    seen = {}

    def spy(_module, args):
        img, txt = args[:2]  # MMDiTBlockT2I calls attn(x, y, pos_img, …)
        seen.setdefault("lengths", (txt.shape[1], img.shape[1]))

    handle = model.patch_blocks[0].attn.register_forward_pre_hook(spy)
    try:
        model(x, torch.full((x.shape[0],), 0.5), cond)
    finally:
        handle.remove()
    n_txt, n_img = seen["lengths"]
    return n_txt, n_txt + n_img


def pid() -> tb.Tiny:
    from backend.args import dynamic_args
    from backend.nn.pixeldit.pid import PidNet

    class RowsPidNet(PidNet):
        """Neo's PidNet, its low-quality latent given the batch of each call. PidNet gates every image token with
        the LQ features of its own row, so the LQ latent must have the call's batch: Neo's processing gives one row
        per image, which fits its PiD passes (CFG 1); at CFG > 1 the cond and uncond rows of one call need it twice
        (the checks sample with CFG 3 and batch 2)."""

        def forward(self, x, *args, **kwargs):
            lq, sigma = dynamic_args.lq_latent
            dynamic_args.lq_latent = [lq[:1].expand(x.shape[0], *lq.shape[1:]), sigma]
            return super().forward(x, *args, **kwargs)

    torch.manual_seed(0)
    model = RowsPidNet(
        lq_latent_channels=4, lq_hidden_dim=16, lq_num_res_blocks=1, lq_interval=2, sr_scale=4,
        latent_spatial_down_factor=8, rope_ref_h=64, rope_ref_w=64, in_channels=3, num_groups=2, hidden_size=64,
        pixel_hidden_size=4, pixel_attn_hidden_size=48, pixel_num_groups=2, patch_depth=3, pixel_depth=2,
        patch_size=16, txt_embed_dim=TXT_DIM, txt_max_length=16,
    )  # fmt: skip
    tb.init_weights(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # parameters PixDiT leaves uninitialised (torch.empty)
        model.y_pos_embedding.copy_(torch.randn(model.y_pos_embedding.shape, generator=g) * 0.1)
        for gate in model.lq_proj.gate_modules:
            gate.log_alpha.fill_(0.0)
    lq = torch.randn(1, 4, 2, 2, generator=g)  # the low-quality image's VAE latent (4× upscale: 8 px per value)
    dynamic_args.lq_latent = [lq, torch.tensor([0.3])]
    return tb.Tiny("PiD", model, 3, _cond, shift=1.5, downscale=1, host_span=host_span)


BUILDERS = {"pid": pid}
