"""One way into the self-attention of Forge Neo's newer DiTs (Z-Image, Lumina 2, Qwen-Image, …), by model family.

Their blocks call a module-level attention function (`attention_function(q, k, v, heads, mask, skip_reshape=…)`,
after RoPE) and offer no patch point inside the block. A family's `Site` names the self-attention modules of each
layer group and the module functions they call; for one model call `handling` swaps those functions for one that
runs a handler, and forward hooks on the named modules tell the handler which layer is calling. A call from anywhere
else (a text-only refiner, a cross-attention) reaches the host's function untouched. Everything is restored in
`finally`.

A handler is `handler(key, q, k, v, heads, mask, kwargs, original)`: `key` is (group, index, 0), q/k/v as the block
passed them ((B, tokens, heads·d), or (B, heads, tokens, d) with `skip_reshape`), and `original(q, k, v, heads,
mask=…, **kwargs)` the host's own function.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Site:
    """How a family's blocks reach their attention. `modules(model)`: the self-attention modules of each layer group,
    in the family's group order; `functions`: (module, name) of every function they call for it; `span(model, x,
    tokens, **inputs)`: the image tokens' [start, end) in an attention call over `tokens` tokens of the model call whose
    latent is `x`, from the host's own inputs; `channels(model)`: the attention width that tags a reference;
    `inputs(model, x, c)` (optional): what `span` needs from the model call's other arguments `c` (e.g. reference
    latents whose tokens the host appends to the image's), as keyword arguments; it may refuse a call it cannot
    serve, before the model runs."""

    modules: Callable[[Any], Sequence[Sequence[Any]]]
    functions: tuple[tuple[str, str], ...]
    span: Callable[..., tuple[int, int]]
    channels: Callable[[Any], int]
    inputs: Callable[[Any, Any, dict], dict] | None = None


def counts(site: Site, model: Any) -> tuple[int, ...]:
    return tuple(len(group) for group in site.modules(model))


def span_inputs(site: Site, model: Any, x: Any, c: dict) -> dict:
    """The keyword arguments of `site.span` for one model call (latent `x`, other arguments `c`)."""
    return {} if site.inputs is None else site.inputs(model, x, c)


def _bind(original: Callable) -> Callable:
    def call(q, k, v, heads, mask=None, *rest, **kwargs):
        if rest:  # never seen from the hosts' blocks; passed on as they came
            return original(q, k, v, heads, mask, *rest, **kwargs)
        return q, k, v, heads, mask, kwargs

    return call


@contextmanager
def handling(site: Site, model: Any, groups: Sequence[str], handler: Callable) -> Iterator[None]:
    """For the duration of the block: calls of the site's functions from its modules run `handler`."""
    current: list = [None]
    hooks = []
    for group, modules in zip(groups, site.modules(model), strict=True):
        for index, module in enumerate(modules):
            key = (group, index, 0)
            hooks.append(module.register_forward_pre_hook(lambda _m, _a, key=key: current.__setitem__(0, key)))
            hooks.append(module.register_forward_hook(lambda _m, _a, _o: current.__setitem__(0, None)))
    swapped = []
    try:
        for module_name, name in site.functions:
            module = importlib.import_module(module_name)
            original = getattr(module, name)
            bind = _bind(original)

            def attention(*args, _original=original, _bind=bind, **kwargs):
                key = current[0]
                if key is None:
                    return _original(*args, **kwargs)
                bound = _bind(*args, **kwargs)
                if not isinstance(bound, tuple):
                    return bound
                q, k, v, heads, mask, kw = bound
                return handler(key, q, k, v, heads, mask, kw, _original)

            swapped.append((module, name, original))
            setattr(module, name, attention)
        yield
    finally:
        for module, name, original in reversed(swapped):
            setattr(module, name, original)
        for hook in hooks:
            hook.remove()
