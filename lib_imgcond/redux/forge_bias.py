"""Redux's attention bias on Flux: a log-strength key bias on the Redux text columns of the cond rows.

A model function wrapper learns, per model call, which rows are cond/uncond and how long the text is, and the bias
reaches the attention in the way the host offers (`host.capabilities()`):

* Forge Neo: the Flux forward honours `transformer_options["patches_replace"]["dit"]` block replaces and every block
  takes an `attn_mask`, so each double/single block is replaced by one that runs the original block with the bias
  merged into its mask (another extension's replace for the same block is chained to). Nothing module-level changes.
* Forge 2.0: no patch point reaches the attention, so for one model call the `attention` function of the module that
  defines the model (`backend.nn.flux` for Flux, `backend.nn.chroma` for Chroma, whose blocks call their own module's
  name) runs the bias handler through `flux_attention` (RoPE + torch SDPA with the bias), restored in `finally`.

The bias is sized from each attention call's own length (text + image tokens, and Kontext's reference tokens).
"""

from __future__ import annotations

from typing import Any

import torch

from lib_imgcond.host import capabilities as webui
from lib_imgcond.host import flux_attention, forge
from lib_imgcond.redux import tokens as rx


def bias_rows(job: Any, cond_or_uncond: list, batch: int, n_txt: int, n_img: int, dtype, device) -> torch.Tensor | None:
    """(batch, 1, 1, n_txt + n_img) key bias for one model call: log-strength on the Redux columns of cond rows
    (the Redux block is the last `job.count` text tokens), zero for uncond rows. None when nothing is biased."""
    if 0 not in cond_or_uncond or n_txt < job.count:
        return None
    base = n_txt - job.count
    spans = [(base + s.start, base + s.start + s.count) for s in job.spans if s.bias_strength is not None]
    strengths = [s.bias_strength for s in job.spans if s.bias_strength is not None]
    row = rx.attention_bias(n_txt, n_img, spans, strengths, dtype=dtype, device=device)
    chunk = batch // len(cond_or_uncond)
    out = torch.zeros(batch, 1, 1, n_txt + n_img, dtype=dtype, device=device)
    for i, branch in enumerate(cond_or_uncond):
        if branch == 0:
            out[i * chunk : (i + 1) * chunk] = row
    return out


def merged_mask(mask: torch.Tensor | None, bias: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """The host's incoming attention mask (bool keep-mask or additive; (L, L), (B, L, L) or (B, H, L, L)) plus our
    (B, 1, 1, L) key bias, as one additive 4-D mask."""
    if mask is None or bias is None:
        return bias if mask is None else mask
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    while mask.ndim < 4:
        mask = mask.unsqueeze(0 if mask.ndim == 2 else 1)
    return mask.to(bias.dtype) + bias


class CallBias:
    """The bias of one model call, built once per (batch, length, dtype, device) and shared by its layers."""

    def __init__(self, job: Any, rows: list, n_txt: int):
        self.job, self.rows, self.n_txt = job, rows, n_txt
        self.cache: dict[tuple, torch.Tensor | None] = {}

    def __call__(self, batch: int, length: int, dtype, device) -> torch.Tensor | None:
        key = (batch, length, dtype, device)
        if key not in self.cache:
            self.cache[key] = bias_rows(self.job, self.rows, batch, self.n_txt, length - self.n_txt, dtype, device)
        return self.cache[key]


def handler(bias: CallBias):
    """The flux_attention handler that adds the call's key bias to the blocks' attention (Forge 2.0)."""

    def handle(q, k, v, pe, mask, _options, call_next):
        extra = bias(q.shape[0], q.shape[2], q.dtype, q.device)
        return call_next(q, k, v, pe, merged_mask(mask, extra, q.dtype) if extra is not None else mask)

    return handle


def block_replace(state: Any, existing):
    """A Neo `dit` block replace: the original block (or `existing`, another extension's replace) with the call's
    bias merged into the block's `attn_mask`."""

    def replace(args, extra):
        bias = state.call
        if bias is not None:
            img, txt = args["img"], args.get("txt")
            length = img.shape[1] + (txt.shape[1] if txt is not None else 0)  # single blocks get txt+img as img
            mask = bias(img.shape[0], length, img.dtype, img.device)
            if mask is not None:
                args = {**args, "attn_mask": merged_mask(args.get("attn_mask"), mask, img.dtype)}
        return existing(args, extra) if existing is not None else extra["original_block"](args)

    return forge.mark_ours(replace, existing)


def make_wrapper(job: Any, state: Any, inner, swap: bool, model: Any = None):
    """Model function wrapper: sets `state.call` for one model call with cond rows while Redux is active; with
    `swap` (Forge 2.0) also hands the call's bias to the blocks' attention through `flux_attention`."""

    def call(apply_model, args):
        if inner is not None:
            return inner(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def wrapper(apply_model, args):
        rows = list(args.get("cond_or_uncond") or [])
        context = args["c"].get("c_crossattn")
        if not state.active or context is None or 0 not in rows:
            return call(apply_model, args)
        state.call = CallBias(job, rows, int(context.shape[1]))
        state.biased_calls += 1
        try:
            if not swap:
                return call(apply_model, args)
            with flux_attention.handling(model, handler(state.call)):
                return call(apply_model, args)
        finally:
            state.call = None

    return wrapper


def install(unet: Any, job: Any, state: Any) -> None:
    """Put the bias on a pass's UnetPatcher clone, by the host's mechanism."""
    blocks = webui.capabilities().flux_block_replace
    model = unet.model.diffusion_model
    inner = unet.model_options.get("model_function_wrapper")
    unet.set_model_unet_function_wrapper(make_wrapper(job, state, inner, swap=not blocks, model=model))
    if not blocks:
        return
    replaces = unet.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for kind, layers in (("double_block", model.double_blocks), ("single_block", model.single_blocks)):
        for i in range(len(layers)):
            existing = forge.resolve_replace(replaces, (kind, i))
            unet.set_model_patch_replace(block_replace(state, existing), "dit", kind, i)
