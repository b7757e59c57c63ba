"""One way into the self-attention of Forge Neo's newer DiTs (Z-Image, Lumina 2, Qwen-Image, …), by model family.

Their blocks call a module-level attention function (`attention_function(q, k, v, heads, mask, skip_reshape=…)`,
after RoPE) and offer no patch point inside the block. A family's `Site` names the self-attention modules of each
layer group and the module functions they call; for one model call `handling` swaps those functions for one that
runs a handler, and forward hooks on the named modules tell the handler which layer is calling. A call from anywhere
else (a text-only refiner, a cross-attention) reaches the host's function untouched. Everything is restored in
`finally`.

A handler is `handler(key, q, k, v, heads, mask, kwargs, original)`: `key` is (group, index, 0), q/k/v as the block
passed them ((B, tokens, heads·d), or (B, heads, tokens, d) with `skip_reshape`), and `original(q, k, v, heads,
mask=…, **kwargs)` the host's own function. `handling` yields a `Calling`: the calling layer and that module's own
inputs, for a family whose image tokens are placed by them (`image_span`).
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
    # span takes a fourth argument, the calling module's `Inputs`: for a family whose calls hold tokens that the
    # latent and the token count do not place (Qwen-Image: the prompt before the image, edit references after it)
    span_inputs: bool = False
    # keyword arguments of `span` read once per model call from its other arguments (`inputs(model, x, c)`; it may
    # also refuse the call before the model runs): Krea 2's reference-latent tokens
    inputs: Callable[[Any, Any, dict], dict] | None = None


@dataclass(frozen=True)
class Inputs:
    """The positional and keyword arguments a site's module was called with."""

    args: tuple
    kwargs: dict

    def get(self, name: str, position: int) -> Any:
        """The argument `name`, passed by keyword or at `position`; None when not passed."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[position] if position < len(self.args) else None


@dataclass
class Calling:
    """The site's module running now (None between them): its layer key and its inputs."""

    key: tuple | None = None
    inputs: Inputs | None = None


def counts(site: Site, model: Any) -> tuple[int, ...]:
    return tuple(len(group) for group in site.modules(model))


def image_span(
    site: Site, model: Any, x: Any, tokens: int, inputs: Inputs | None, extra: dict | None = None
) -> tuple[int, int]:
    """The image tokens' [start, end) in an attention call of `tokens` tokens from the calling module (`inputs`),
    with the model call's `span_inputs` (`extra`)."""
    args = (model, x, tokens, inputs) if site.span_inputs else (model, x, tokens)
    return site.span(*args, **(extra or {}))


def call_inputs(site: Site, model: Any, x: Any, c: dict) -> dict:
    """The keyword arguments of `site.span` for one model call (latent `x`, other arguments `c`)."""
    return {} if site.inputs is None else site.inputs(model, x, c)


def _bind(original: Callable) -> Callable:
    def call(q, k, v, heads, mask=None, *rest, **kwargs):
        if rest:  # never seen from the hosts' blocks; passed on as they came
            return original(q, k, v, heads, mask, *rest, **kwargs)
        return q, k, v, heads, mask, kwargs

    return call


@contextmanager
def handling(site: Site, model: Any, groups: Sequence[str], handler: Callable) -> Iterator[Calling]:
    """For the duration of the block: calls of the site's functions from its modules run `handler`. Yields the
    `Calling` that names the module running (its inputs are kept only while it runs)."""
    calling = Calling()

    def enter(key):
        def hook(_module, args, kwargs):
            calling.key, calling.inputs = key, Inputs(args, kwargs)

        return hook

    def leave(_module, _args, _out):
        calling.key = calling.inputs = None

    hooks = []
    for group, modules in zip(groups, site.modules(model), strict=True):
        for index, module in enumerate(modules):
            hooks.append(module.register_forward_pre_hook(enter((group, index, 0)), with_kwargs=True))
            hooks.append(module.register_forward_hook(leave))
    swapped = []
    try:
        for module_name, name in site.functions:
            module = importlib.import_module(module_name)
            original = getattr(module, name)
            bind = _bind(original)

            def attention(*args, _original=original, _bind=bind, **kwargs):
                key = calling.key
                if key is None:
                    return _original(*args, **kwargs)
                bound = _bind(*args, **kwargs)
                if not isinstance(bound, tuple):
                    return bound
                q, k, v, heads, mask, kw = bound
                return handler(key, q, k, v, heads, mask, kw, _original)

            swapped.append((module, name, original))
            setattr(module, name, attention)
        yield calling
    finally:
        for module, name, original in reversed(swapped):
            setattr(module, name, original)
        for hook in hooks:
            hook.remove()
        calling.key = calling.inputs = None
