"""host/dit_attention and the Qwen-Image site on fake modules: the calling module's inputs reach the span, the image
span is the generated image's tokens between the text and any edit references, and foreign attention is refused."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host import dit_attention
from lib_imgcond.host.sites import qwen
from lib_imgcond.host.sites import registry as sites

HEADS, D = 2, 4


@pytest.fixture
def host(monkeypatch):
    """A stand-in `backend.nn.qwen` whose `Attention` calls the module's `attention_function` as Neo's does."""
    mod = types.ModuleType(qwen.MODULE)
    calls = []

    def attention_function(q, k, v, heads, mask=None, skip_reshape=False):
        calls.append(q.shape[1])
        return v

    class Attention(torch.nn.Module):
        def forward(self, hidden_states, encoder_hidden_states=None, image_rotary_emb=None):
            joint = torch.cat((encoder_hidden_states, hidden_states), dim=1)
            out = sys.modules[qwen.MODULE].attention_function(joint, joint, joint, HEADS, None)
            n = encoder_hidden_states.shape[1]
            return out[:, n:], out[:, :n]

    Attention.__module__ = qwen.MODULE
    mod.attention_function, mod.Attention, mod.calls = attention_function, Attention, calls
    for name in ("backend", "backend.nn"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, qwen.MODULE, mod)
    return mod


def model_of(attention_cls, blocks: int = 2):
    model = types.SimpleNamespace(patch_size=2, inner_dim=HEADS * D)
    model.transformer_blocks = [types.SimpleNamespace(attn=attention_cls()) for _ in range(blocks)]
    return model


def test_the_registry_names_the_qwen_site():
    assert sites.site("qwen_image") is qwen.SITE and qwen.SITE.span_inputs


def test_the_span_is_the_generated_images_tokens_between_the_text_and_the_edit_references(host):
    model = model_of(host.Attention)
    x = torch.zeros(1, 16, 1, 7, 10)  # odd height: the host pads it to the patch (⌈7/2⌉·⌈10/2⌉ = 20 tokens)
    text, stream = torch.zeros(1, 9, HEADS * D), torch.zeros(1, 20 + 12, HEADS * D)  # 12 edit-reference tokens
    by_name = dit_attention.Inputs((), {"hidden_states": stream, "encoder_hidden_states": text})
    by_place = dit_attention.Inputs((stream, text), {})
    for inputs in (by_name, by_place):
        assert dit_attention.image_span(qwen.SITE, model, x, 9 + 32, inputs) == (9, 29)
    with pytest.raises(ImgcondError, match=r"Qwen-Image.*does not hold 9 text tokens"):
        qwen.SITE.span(model, x, 9 + 20, by_name)  # a call of another token count than its module's streams
    with pytest.raises(ImgcondError, match=r"Qwen-Image.*without its text and image streams"):
        qwen.SITE.span(model, x, 41, dit_attention.Inputs((stream,), {}))


def test_handling_gives_the_handler_the_calling_modules_inputs_then_forgets_them(host):
    model = model_of(host.Attention)
    original = host.attention_function
    seen = []

    def handler(key, q, k, v, heads, mask, kw, call_host):
        inputs = calling[0].inputs
        seen.append((key, dit_attention.image_span(qwen.SITE, model, x, q.shape[1], inputs)))
        return call_host(q, k, v, heads, mask=mask, **kw)

    x = torch.zeros(1, 16, 1, 4, 4)
    text, image = torch.randn(1, 5, HEADS * D), torch.randn(1, 4 + 6, HEADS * D)
    calling = []
    with dit_attention.handling(qwen.SITE, model, ("blocks",), handler) as state:
        calling.append(state)
        for block in model.transformer_blocks:
            block.attn(hidden_states=image, encoder_hidden_states=text)
        assert state.key is None and state.inputs is None  # between the modules' calls
        host.attention_function(text, text, text, HEADS)  # a call from elsewhere passes untouched
    assert seen == [(("blocks", 0, 0), (5, 9)), (("blocks", 1, 0), (5, 9))]
    assert host.attention_function is original and host.calls == [15, 15, 5]
    assert all(not b.attn._forward_pre_hooks and not b.attn._forward_hooks for b in model.transformer_blocks)


def test_attention_of_another_module_is_refused_by_name(host):
    class Foreign(host.Attention):  # e.g. Nunchaku's, which calls its own module's attention function
        pass

    assert dit_attention.counts(qwen.SITE, model_of(host.Attention, 3)) == (3,)
    with pytest.raises(ImgcondError, match=r"Qwen-Image.*test_dit_sites_glue.*Foreign.*Nunchaku"):
        dit_attention.counts(qwen.SITE, model_of(Foreign))
