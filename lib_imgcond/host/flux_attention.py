"""One way into the attention of a Flux-family model's blocks, shared by every technique that needs it.

Neither host has a patch point inside the attention of Flux's double/single blocks (Neo's `dit` block replaces
reach the block, not its attention), so for one model call the `attention` function of the module whose name the
blocks call (`swap_module`) is swapped for one that runs a technique's handler, and restored in `finally`.
A handler is `handler(q, k, v, pe, mask, transformer_options, call_next)`; `call_next(q, k, v, pe, mask)` runs what was
there before: another technique's handler when its swap is active (swaps nest), else the host's own function, called
exactly as the host's blocks call it (bit-identical output). `pe=None` means RoPE was already applied; a mask is an
additive (B, 1|heads, 1|L, L) attention mask, which Forge 2.0's own function cannot take (then RoPE + torch SDPA).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

_OURS = "_imgcond_attention"


def swap_module(model: Any) -> str:
    """The module whose `attention` the model's blocks call: the one defining the model's class when it has one
    (Forge 2.0's Chroma), else Flux's."""
    name = type(model).__module__
    return name if hasattr(sys.modules.get(name), "attention") else "backend.nn.flux"


def module_of(model: Any):
    return sys.modules[swap_module(model)]


def rope_of(module: Any) -> Callable:
    """The host's RoPE for this module's attention (`apply_rope(q, k, pe)`)."""
    fn = getattr(module, "apply_rope", None)
    if fn is None:
        import backend.nn.flux as fluxmod

        fn = fluxmod.apply_rope
    return fn


def kernel_of(module: Any) -> Callable:
    """The host's attention kernel behind this module's `attention` (`attention_function(q, k, v, heads, …)`)."""
    fn = getattr(module, "attention_function", None)
    if fn is None:
        from backend.attention import attention_function as fn
    return fn


def _takes_mask(fn: Callable) -> bool:
    try:
        return "mask" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _host_call(
    module: Any, original: Callable, takes_mask: bool, q, k, v, pe, mask, options, extra: dict
) -> torch.Tensor:
    """The host's own attention: as its blocks call it where it can take the arguments, else its parts.
    `takes_mask`: `_takes_mask(original)`, probed once per `handling`, not per block call."""
    if takes_mask:  # Neo: attention(q, k, v, pe, mask=None, transformer_options={})
        kw = dict(extra)
        if options is not None:
            kw["transformer_options"] = options
        return original(q, k, v, pe=pe, mask=mask, **kw)
    if pe is not None and mask is None:  # Forge 2.0 as its blocks call it
        return original(q, k, v, pe=pe)
    if pe is not None:
        q, k = rope_of(module)(q, k, pe)
    if mask is None:
        return kernel_of(module)(q, k, v, q.shape[1], skip_reshape=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    b, heads, length, dim = out.shape
    return out.transpose(1, 2).reshape(b, length, heads * dim)


@contextmanager
def handling(model: Any, handler: Callable) -> Iterator[None]:
    """For the duration of the block: the blocks' `attention` runs `handler` (on top of any handler already there)."""
    module = module_of(model)
    previous = module.attention
    nested = getattr(previous, _OURS, False)
    takes_mask = not nested and _takes_mask(previous)

    def attention(q, k, v, pe=None, mask=None, transformer_options=None, **extra):
        def call_next(q2, k2, v2, pe2, mask2):
            if nested:
                return previous(q2, k2, v2, pe=pe2, mask=mask2, transformer_options=transformer_options, **extra)
            return _host_call(module, previous, takes_mask, q2, k2, v2, pe2, mask2, transformer_options, extra)

        call_next.direct = not nested  # the host's own function follows: its kernel may be called directly
        return handler(q, k, v, pe, mask, transformer_options, call_next)

    setattr(attention, _OURS, True)
    module.attention = attention
    try:
        yield
    finally:
        module.attention = previous
