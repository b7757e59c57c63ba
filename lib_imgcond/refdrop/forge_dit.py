"""RefDrop's attention sites on DiTs: Flux's double- and single-stream blocks, and the families of `host/sites`.

A model function wrapper runs each model call with `flux_attention.handling` active (the blocks' attention runs our
handler, restored in `finally`). The handler knows its block from Neo's `transformer_options` (block type and index)
or, on Forge 2.0, by counting calls in execution order (double blocks, then single blocks); it applies the host's
RoPE itself only for selected blocks and hands `Runner.attend` the roped (B, heads, tokens, head_dim) tensors with the
call's text length, so the reference branch attends [current text; reference image] K/V (refdrop/joint.py).

The image tokens of a Flux call are the generated image's: the text comes first, and an edit's reference images
(Neo's `ref_latents`: Flux Kontext, Flux.2) follow the image; both are context the reference branch keeps.

The other DiTs (`install_site`) go through `host.dit_attention`: the family's site names its self-attention modules
and where a call's image tokens are; every other token of the call is context the reference branch keeps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host import dit_attention, flux_attention
from lib_imgcond.refdrop import joint as joint_kv
from lib_imgcond.refdrop import layers as rd
from lib_imgcond.refdrop.forge_patch import Joint, Runner


def blocks(model: Any) -> tuple[int, int, int]:
    """(double blocks, single blocks, attention channels) of a Flux-family transformer."""
    double, single = len(model.double_blocks), len(model.single_blocks)
    channels = getattr(model, "hidden_size", None) or model.double_blocks[0].img_attn.qkv.in_features
    return double, single, int(channels)


def image_span(model: Any, x: Any, n_txt: int, tokens: int) -> tuple[int, int]:
    """[start, end) of the generated image's tokens in a Flux attention call of `tokens` tokens: after the `n_txt`
    text tokens, ⌈h/p⌉·⌈w/p⌉ patches of the model call's latent `x`; an edit's reference-image tokens follow."""
    p = int(getattr(model, "patch_size", 2))  # Forge 2.0's Flux has no attribute: its patches are 2 × 2
    image = math.ceil(x.shape[-2] / p) * math.ceil(x.shape[-1] / p)
    if n_txt + image > tokens:
        raise ImgcondError(
            f"RefDrop: a Flux attention call of {tokens} tokens cannot hold {n_txt} text and {image} image tokens"
        )
    return n_txt, n_txt + image


def _reference_mask(mask: torch.Tensor, rows: slice | None, image: slice, length: int) -> torch.Tensor:
    """A mask of the current call for the reference branch's keys: its context columns kept, the reference's image
    columns open (0 for an additive mask, True for a boolean one)."""
    while mask.ndim < 4:
        mask = mask.unsqueeze(0 if mask.ndim == 2 else 1)
    if rows is not None and mask.shape[0] > 1:
        mask = mask[rows]
    n = mask.shape[-1]
    start, end = image.start or 0, n if image.stop is None else image.stop
    n_ref = length - start - (n - end)
    open_ = torch.ones if mask.dtype == torch.bool else torch.zeros
    ref = open_(*mask.shape[:-1], n_ref, dtype=mask.dtype, device=mask.device)
    return torch.cat((mask[..., :start], ref, mask[..., end:]), dim=-1)


def install(unet: Any, runner: Runner) -> None:
    """Wrap the pass's model function so RefDrop's handler sits in the blocks' attention for each model call."""
    model = unet.model.diffusion_model
    module = flux_attention.module_of(model)
    rope, kernel = flux_attention.rope_of(module), flux_attention.kernel_of(module)
    n_double, n_single, _ = blocks(model)
    inner = unet.model_options.get("model_function_wrapper")
    layers = runner.job.layers
    call: dict = {"chunks": [0], "n_txt": 0, "count": 0, "x": None}

    def handler(q, k, v, pe, mask, options, call_next):
        i = call["count"] % (n_double + n_single)
        call["count"] += 1
        if options and "block_type" in options:
            key = (str(options["block_type"]), int(options["block_index"]), 0)
        else:
            key = ("double", i, 0) if i < n_double else ("single", i - n_double, 0)
        if key not in layers:
            return call_next(q, k, v, pe, mask)
        if pe is not None:
            q, k = rope(q, k, pe)
        image = slice(*image_span(model, call["x"], call["n_txt"], q.shape[2]))

        def plain():
            return call_next(q, k, v, None, mask)

        def attend_ref(qx, kx, vx, rows):
            if mask is None:
                return kernel(qx, kx, vx, qx.shape[1], skip_reshape=True)
            m = _reference_mask(mask, rows, image, kx.shape[2]).to(qx.dtype)
            out = F.scaled_dot_product_attention(qx, kx, vx, attn_mask=m, dropout_p=0.0, is_causal=False)
            b, heads, length, dim = out.shape
            return out.transpose(1, 2).reshape(b, length, heads * dim)

        fusable = mask is None and call_next.direct
        joint = Joint(image.start, image.stop)
        return runner.attend(key, q, k, v, call["chunks"], plain, attend_ref, fusable=fusable, joint=joint)

    def model_call(apply_model):
        def run(x, t, **c):
            options = c.get("transformer_options") or {}
            call["chunks"] = list(options.get("cond_or_uncond") or [0])
            call["n_txt"] = int(c["c_crossattn"].shape[1])
            call["count"] = 0
            call["x"] = x
            return apply_model(x, t, **c)

        return run

    def wrapper(apply_model, args):
        run = model_call(apply_model)
        with flux_attention.handling(model, handler):
            if inner is not None:
                return inner(run, args)
            return run(args["input"], args["timestep"], **args["c"])

    unet.set_model_unet_function_wrapper(wrapper)


def install_site(unet: Any, runner: Runner, site: dit_attention.Site, groups: tuple[str, ...]) -> None:
    """Wrap the pass's model function so RefDrop's handler runs in the family's self-attention for each model call."""
    model = unet.model.diffusion_model
    inner = unet.model_options.get("model_function_wrapper")
    layers = runner.job.layers
    call: dict = {"chunks": [0], "x": None, "calling": None, "inputs": {}}

    def handler(key, q, k, v, heads, mask, kw, original):
        if key not in layers:
            return original(q, k, v, heads, mask=mask, **kw)
        split = not kw.get("skip_reshape", False)  # (B, tokens, heads·d) in: attend in (B, heads, tokens, d)
        # (B, heads, tokens, d) out (PiD's joint attention): blended as (B, tokens, heads·d), handed back as asked
        heads_out = bool(kw.get("skip_output_reshape", False))
        kw = {name: arg for name, arg in kw.items() if name != "skip_output_reshape"}
        q4, k4, v4 = (joint_kv.unpack(t, heads) for t in (q, k, v)) if split else (q, k, v)
        image = slice(*dit_attention.image_span(site, model, call["x"], q4.shape[2], call["calling"].inputs,
                                                call["inputs"]))  # fmt: skip

        def plain():
            return original(q, k, v, heads, mask=mask, **kw)

        def attend_ref(qx, kx, vx, rows):
            m = None if mask is None else _reference_mask(mask, rows, image, kx.shape[2])
            return original(qx, kx, vx, heads, mask=m, **{**kw, "skip_reshape": True})

        joint = Joint(image.start, image.stop)
        out = runner.attend(key, q4, k4, v4, call["chunks"], plain, attend_ref, joint=joint)
        return joint_kv.unpack(out, heads) if heads_out else out

    def wrapper(apply_model, args):
        def run(x, t, **c):
            options = c.get("transformer_options") or {}
            if options.get("context_window") is not None:  # Neo's context windows (PiD above 2048 px)
                raise ImgcondError(
                    f"RefDrop on {rd.family_label(runner.job.family)}: this size is sampled in context windows "
                    "(model calls over parts of the image), and RefDrop records and blends whole images; "
                    "choose a smaller size or turn RefDrop off"
                )
            call["chunks"] = list(options.get("cond_or_uncond") or [0])
            call["x"], call["inputs"] = x, dit_attention.call_inputs(site, model, x, c)
            return apply_model(x, t, **c)

        with dit_attention.handling(site, model, groups, handler) as calling:
            call["calling"] = calling
            if inner is not None:
                return inner(run, args)
            return run(args["input"], args["timestep"], **args["c"])

    unet.set_model_unet_function_wrapper(wrapper)
