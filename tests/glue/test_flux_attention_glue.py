"""host/flux_attention: the one swap of a Flux module's `attention` for one model call, nested and restored."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from lib_imgcond.host import flux_attention


def fake_module(name: str, takes_mask: bool):
    mod = types.ModuleType(name)
    calls = []

    def apply_rope(q, k, pe):
        return q + pe, k + pe

    def attention_function(q, k, v, heads, skip_reshape=False, mask=None, **kw):
        scores = q @ k.transpose(-1, -2)
        out = torch.softmax(scores if mask is None else scores + mask, -1) @ v
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    if takes_mask:  # Neo's signature

        def attention(q, k, v, pe, mask=None, transformer_options={}):  # noqa: B006  (the host's own default)
            calls.append(("host", mask is not None))
            if pe is not None:
                q, k = apply_rope(q, k, pe)
            return attention_function(q, k, v, q.shape[1], skip_reshape=True, mask=mask)
    else:  # Forge 2.0's

        def attention(q, k, v, pe):
            calls.append(("host", False))
            q, k = apply_rope(q, k, pe)
            return attention_function(q, k, v, q.shape[1], skip_reshape=True)

    mod.attention, mod.apply_rope, mod.attention_function, mod.calls = attention, apply_rope, attention_function, calls
    sys.modules[name] = mod
    return mod


class Model:
    pass


@pytest.fixture(params=[False, True], ids=["forge2", "neo"])
def module(request, monkeypatch):
    name = "imgcond_fake_flux_" + ("neo" if request.param else "forge")
    mod = fake_module(name, request.param)
    monkeypatch.setattr(Model, "__module__", name)
    yield mod
    sys.modules.pop(name, None)


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, 6, 4, generator=g) for _ in range(4)]


def test_passthrough_handler_is_bit_identical_and_restored(module):
    q, k, v, pe = qkv()
    original = module.attention
    plain = original(q, k, v, pe=pe)
    with flux_attention.handling(Model(), lambda q, k, v, pe, mask, opts, nxt: nxt(q, k, v, pe, mask)):
        assert module.attention is not original
        assert torch.equal(module.attention(q, k, v, pe=pe), plain)
    assert module.attention is original


def test_rope_applied_by_the_handler_then_pe_none_is_identical(module):
    q, k, v, pe = qkv(1)
    plain = module.attention(q, k, v, pe=pe)

    def handler(q, k, v, pe, mask, opts, nxt):
        q, k = flux_attention.rope_of(module)(q, k, pe)
        assert nxt.direct
        return nxt(q, k, v, None, mask)

    with flux_attention.handling(Model(), handler):
        assert torch.equal(module.attention(q, k, v, pe=pe), plain)


def test_handlers_nest_and_both_run_in_either_order(module):
    q, k, v, pe = qkv(2)
    seen = []

    def named(tag):
        def handler(q, k, v, pe, mask, opts, nxt):
            seen.append((tag, nxt.direct))
            return nxt(q, k, v, pe, mask)

        return handler

    original = module.attention
    with flux_attention.handling(Model(), named("outer")), flux_attention.handling(Model(), named("inner")):
        module.attention(q, k, v, pe=pe)
    assert seen == [("inner", False), ("outer", True)]
    assert module.attention is original


def test_a_mask_reaches_the_attention_on_either_host(module):
    q, k, v, pe = qkv(3)
    mask = torch.zeros(1, 1, 1, 6)
    mask[..., 0] = float("-inf")

    def handler(q, k, v, pe, m, opts, nxt):
        return nxt(q, k, v, pe, mask)

    with flux_attention.handling(Model(), handler):
        masked = module.attention(q, k, v, pe=pe)
    assert not torch.allclose(masked, module.attention(q, k, v, pe=pe))


def test_restored_after_an_error(module):
    original = module.attention

    def boom(*_args):
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"), flux_attention.handling(Model(), boom):
        module.attention(*qkv())
    assert module.attention is original
