"""Redux control's patches against small fakes of Forge's documented API: the conditioning modifier, its step
window, the attention-bias wrapper (Forge 2.0) and block replaces (Forge Neo), merged masks.

`backend.*` modules are faked in sys.modules. Nothing here imports Gradio, Forge or scripts/.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lib_imgcond.host import forge
from lib_imgcond.redux import forge_bias as redux_bias
from lib_imgcond.redux import forge_redux as host
from lib_imgcond.redux.spec import SPEC
from tests.glue.fakes import FakeUnetPatcher, fake_p


# --- patches ----------------------------------------------------------------------------------------------------------
class FakeCrossAttn:
    """backend.sampling.condition.ConditionCrossAttn, reduced to what matters here."""

    def __init__(self, cond):
        self.cond = cond

    def can_concat(self, other):
        a, b = self.cond.shape[1], other.cond.shape[1]
        return math.lcm(a, b) // min(a, b) <= 4


@pytest.fixture
def fake_backend(monkeypatch):
    calls = {"attention": 0}

    def attention(q, k, v, pe):
        calls["attention"] += 1
        b, h, n, d = q.shape
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h * d)

    flux = types.ModuleType("backend.nn.flux")
    flux.attention = attention
    flux.apply_rope = lambda q, k, pe: (q, k)
    cond_mod = types.ModuleType("backend.sampling.condition")
    cond_mod.ConditionCrossAttn = FakeCrossAttn
    for name, mod in {
        "backend": types.ModuleType("backend"),
        "backend.nn": types.ModuleType("backend.nn"),
        "backend.nn.flux": flux,
        "backend.sampling": types.ModuleType("backend.sampling"),
        "backend.sampling.condition": cond_mod,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    sys.modules["backend"].nn = sys.modules["backend.nn"]
    sys.modules["backend.nn"].flux = flux
    monkeypatch.setitem(host._STRICT_CLASS, "cls", None)
    host._STRICT_CLASS.clear()
    return flux, calls


def entries(t: torch.Tensor):
    return [{"model_conds": {"c_crossattn": FakeCrossAttn(t), "y": "pooled"}, "strength": 1.0}]


def job_with(n=4, d=8, spans=None, **kw):
    v = SPEC.parse([{**kw}])
    spans = spans or [host.Span(1, 0, n, None)]
    return host.Job(v, torch.randn(1, n, d), spans)


def test_modifier_appends_to_cond_only_without_touching_inputs(fake_backend):
    job = job_with()
    unet = FakeUnetPatcher()
    host.install(unet, job)
    (modifier,) = unet.model_options["conditioning_modifiers"]
    ctx, uctx = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    cond, uncond = entries(ctx), entries(uctx)
    out = modifier("model", "x", torch.tensor([0.5, 0.5]), uncond, cond, 3.5, {}, 1)
    new_cond, new_uncond = out[4], out[3]
    got = new_cond[0]["model_conds"]["c_crossattn"].cond
    assert got.shape == (2, 10, 8)
    assert (
        torch.equal(got[:, :6], ctx) and torch.equal(got[0, 6:], job.tokens[0]) and torch.equal(got[1, 6:], got[0, 6:])
    )
    assert new_uncond[0]["model_conds"]["c_crossattn"].cond is uctx  # same tensor: uncond untouched
    assert new_cond[0]["model_conds"]["y"] == "pooled" and new_cond[0]["strength"] == 1.0
    assert cond[0]["model_conds"]["c_crossattn"].cond is ctx  # the caller's (cached) conditioning is not edited
    # 10 vs 6 would be repeated to 30 by Forge; the strict class refuses to batch them
    strict = new_cond[0]["model_conds"]["c_crossattn"]
    assert not strict.can_concat(new_uncond[0]["model_conds"]["c_crossattn"])
    assert not new_uncond[0]["model_conds"]["c_crossattn"].can_concat(strict)
    assert modifier("model", "x", torch.tensor([0.5]), None, entries(ctx), 1.0, {}, 1)[3] is None


def test_step_window(fake_backend):
    predictor = types.SimpleNamespace(percent_to_sigma=lambda p: 1.0 - p)
    model = types.SimpleNamespace(predictor=predictor)
    assert host.in_window(model, 0.8, 0.0, 1.0)
    assert not host.in_window(model, 0.8, 0.5, 1.0) and host.in_window(model, 0.3, 0.5, 1.0)
    assert not host.in_window(model, 0.1, 0.0, 0.5)
    job = job_with(start=0.5)
    unet = FakeUnetPatcher()
    host.install(unet, job)
    (modifier,) = unet.model_options["conditioning_modifiers"]
    ctx = torch.randn(1, 6, 8)
    early = modifier(model, "x", torch.tensor([0.9]), None, entries(ctx), 1.0, {}, 1)[4]
    assert early[0]["model_conds"]["c_crossattn"].cond is ctx
    late = modifier(model, "x", torch.tensor([0.2]), None, entries(ctx), 1.0, {}, 1)[4]
    assert late[0]["model_conds"]["c_crossattn"].cond.shape[1] == 10


def test_empty_step_window_never_appends(fake_backend):
    model = types.SimpleNamespace(predictor=types.SimpleNamespace(percent_to_sigma=lambda p: 1.0 - p))
    unet = FakeUnetPatcher()
    host.install(unet, job_with(start=0.0, end=0.0))
    (modifier,) = unet.model_options["conditioning_modifiers"]
    ctx = torch.randn(1, 6, 8)
    for sigma in (1.0, 0.5, 0.0):
        out = modifier(model, "x", torch.tensor([sigma]), None, entries(ctx), 1.0, {}, 1)[4]
        assert out[0]["model_conds"]["c_crossattn"].cond is ctx


def test_bias_rows_cond_only():
    job = job_with(n=5, spans=[host.Span(1, 0, 3, 0.5), host.Span(2, 3, 2, None)])
    bias = redux_bias.bias_rows(job, [1, 0], 4, n_txt=9, n_img=7, dtype=torch.float32, device="cpu")
    assert bias.shape == (4, 1, 1, 16)
    assert torch.equal(bias[:2], torch.zeros(2, 1, 1, 16))  # uncond chunk
    expected = torch.zeros(16)
    expected[4:7] = math.log(0.5)  # Redux block = last 5 text tokens: [4, 9); image 1's span is its first 3
    assert torch.allclose(bias[2:, 0, 0], expected.expand(2, -1))
    assert redux_bias.bias_rows(job, [1], 2, 9, 7, torch.float32, "cpu") is None


def test_wrapper_patches_attention_only_during_the_call(fake_backend):
    flux, _ = fake_backend
    original = flux.attention
    job = job_with(n=3, spans=[host.Span(1, 0, 3, 0.0)])
    unet = FakeUnetPatcher()
    state = host.install(unet, job)
    wrapper = unet.model_options["model_function_wrapper"]
    q = torch.randn(1, 2, 5 + 3 + 4, 6)
    seen = {}

    def apply_model(x, t, c_crossattn, **kw):
        seen["patched"] = flux.attention is not original
        return flux.attention(q, q, q, None)

    state.active = True
    biased = wrapper(
        apply_model, {"input": 0, "timestep": 0, "c": {"c_crossattn": torch.zeros(1, 8, 4)}, "cond_or_uncond": [0]}
    )
    assert seen["patched"] and flux.attention is original
    keep = torch.cat([torch.arange(0, 5), torch.arange(8, 12)])  # strength 0 removes the 3 Redux columns
    ref = F.scaled_dot_product_attention(q, q[:, :, keep], q[:, :, keep]).transpose(1, 2).reshape(1, 12, 12)
    torch.testing.assert_close(biased, ref, atol=1e-6, rtol=0)

    def failing(*a, **k):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        wrapper(failing, {"input": 0, "timestep": 0, "c": {"c_crossattn": torch.zeros(1, 8, 4)}, "cond_or_uncond": [0]})
    assert flux.attention is original
    state.active = False
    wrapper(apply_model, {"input": 0, "timestep": 0, "c": {"c_crossattn": torch.zeros(1, 8, 4)}, "cond_or_uncond": [0]})
    assert not seen["patched"]
    wrapper(apply_model, {"input": 0, "timestep": 0, "c": {"c_crossattn": torch.zeros(1, 5, 4)}, "cond_or_uncond": [1]})
    assert not seen["patched"]  # uncond-only calls are never patched


def test_wrapper_chains_an_existing_one(fake_backend):
    order = []
    unet = FakeUnetPatcher()
    unet.set_model_unet_function_wrapper(lambda apply, args: order.append("inner") or apply(args["input"], 0))
    state = host.install(unet, job_with(n=2, spans=[host.Span(1, 0, 2, 0.5)]))
    state.active = True
    unet.model_options["model_function_wrapper"](
        lambda x, t, **c: order.append("model") or x,
        {"input": 1, "timestep": 0, "c": {"c_crossattn": torch.zeros(1, 4, 2)}, "cond_or_uncond": [0]},
    )
    assert order == ["inner", "model"]


def test_no_wrapper_without_bias(fake_backend):
    unet = FakeUnetPatcher()
    host.install(unet, job_with())
    assert "model_function_wrapper" not in unet.model_options


def test_patch_unet_leaves_the_base_patcher_alone(fake_backend):
    p = fake_p("flux")
    base = p.sd_model.forge_objects.unet
    forge.patch_unet(p, lambda unet: host.install(unet, job_with(spans=[host.Span(1, 0, 4, 0.5)])))
    assert "conditioning_modifiers" not in base.model_options and "model_function_wrapper" not in base.model_options


class _NeoFlux:
    """A stand-in Flux of Forge Neo's shape: one double and one single block, each an SDPA over [txt, img] with the
    block's `attn_mask`, run through `transformer_options["patches_replace"]["dit"]` the way Neo's forward does."""

    def __init__(self):
        self.double_blocks, self.single_blocks = [None], [None]
        self.masks = []

    def attend(self, x, mask):  # x: (batch, tokens, features), one head
        self.masks.append(mask)
        h = x[:, None]
        return F.scaled_dot_product_attention(h, h, h, attn_mask=mask)[:, 0]

    def forward(self, txt, img, transformer_options, attn_mask=None):
        replaces = transformer_options.get("patches_replace", {}).get("dit", {})

        def double(args):
            joint = self.attend(torch.cat([args["txt"], args["img"]], dim=1), args.get("attn_mask"))
            n = args["txt"].shape[1]
            return joint[:, :n], joint[:, n:]

        def single(args):
            return {"img": self.attend(args["img"], args.get("attn_mask"))}

        args = {"txt": txt, "img": img, "attn_mask": attn_mask}
        out = replaces[("double_block", 0)](args, {"original_block": double})
        joined = torch.cat(out, dim=1)
        return replaces[("single_block", 0)]({"img": joined, "attn_mask": attn_mask}, {"original_block": single})


def _neo(monkeypatch):
    caps = host.redux_bias.webui.Capabilities(True, flux_block_replace=True)
    monkeypatch.setattr(host.redux_bias.webui, "capabilities", lambda: caps)


def test_neo_bias_goes_through_block_replaces_with_a_mask(fake_backend, monkeypatch):
    """Forge Neo: every double/single block is replaced by one that merges the bias into its `attn_mask` (and
    chains to another extension's replace); the module's attention function is never swapped."""
    flux, _ = fake_backend
    original = flux.attention
    _neo(monkeypatch)
    model = _NeoFlux()
    unet = FakeUnetPatcher(diffusion_model=model)
    theirs = []
    unet.set_model_patch_replace(lambda args, extra: theirs.append(1) or extra["original_block"](args), "dit",
                                 "single_block", 0)  # fmt: skip
    job = job_with(n=3, spans=[host.Span(1, 0, 3, 0.0)])
    state = host.install(unet, job)
    state.active = True
    txt, img = torch.randn(1, 8, 6), torch.randn(1, 4, 6)  # 8 text tokens = 5 prompt + 3 Redux
    incoming = torch.ones(12, 12, dtype=torch.bool)
    incoming[:, 11] = False  # the host's own mask hides the last key

    def apply_model(x, t, c_crossattn, transformer_options):
        seen_swap.append(flux.attention is not original)
        out = model.forward(txt, img, transformer_options, attn_mask=None)
        return model, out

    seen_swap = []
    args = {"input": 0, "timestep": 0, "c": {"c_crossattn": torch.zeros(1, 8, 4),
            "transformer_options": unet.model_options["transformer_options"]}, "cond_or_uncond": [0]}  # fmt: skip
    wrapper = unet.model_options["model_function_wrapper"]
    wrapper(apply_model, args)
    assert seen_swap == [False] and flux.attention is original and theirs == [1]
    assert state.biased_calls == 1 and state.call is None
    assert len(model.masks) == 2
    # both blocks saw the key bias for 8 + 4 tokens: the 3 Redux columns (5, 6, 7) at log(0) = -inf
    for mask in model.masks:
        assert mask.shape == (1, 1, 1, 12)
        assert bool((mask[..., 5:8] == -math.inf).all()) and bool((mask[..., :5] == 0).all())
    # an incoming host mask is merged, not replaced
    merged = redux_bias.merged_mask(incoming, model.masks[0], torch.float32)
    assert merged.shape == (1, 1, 12, 12) and bool((merged[..., 11] == -math.inf).all())
    # outside the window (or an uncond-only call) the blocks run unbiased
    state.active, model.masks = False, []
    wrapper(apply_model, args)
    assert model.masks == [None, None] and state.biased_calls == 1


def test_neo_clone_of_a_patched_patcher_does_not_chain_to_itself(fake_backend, monkeypatch):
    _neo(monkeypatch)
    unet = FakeUnetPatcher(diffusion_model=_NeoFlux())
    job = job_with(n=2, spans=[host.Span(1, 0, 2, 0.5)])
    host.install(unet, job)
    again = unet.clone()
    host.install(again, job)
    fn = again.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]
    assert fn._imgcond and fn._imgcond_inner is None


def test_merged_mask_shapes():
    bias = torch.zeros(2, 1, 1, 5)
    bias[..., 4] = float("-inf")
    assert redux_bias.merged_mask(None, bias, torch.float32) is bias
    additive = torch.randn(5, 5)
    assert redux_bias.merged_mask(additive, None, torch.float32) is additive
    got = redux_bias.merged_mask(additive, bias, torch.float32)
    assert got.shape == (2, 1, 5, 5) and torch.equal(got[1, 0, :, :4], additive[:, :4]) and got[0, 0, 0, 4] == -math.inf
    keep = torch.ones(2, 5, 5, dtype=torch.bool)
    keep[:, :, 0] = False
    got = redux_bias.merged_mask(keep, bias, torch.float32)
    assert got.shape == (2, 1, 5, 5) and bool((got[..., 0] == -math.inf).all()) and bool((got[..., 1:4] == 0).all())
