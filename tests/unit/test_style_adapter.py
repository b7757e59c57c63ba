"""The T2I style adapter (style.adapter) against small random modules in the real key layout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.style import adapter as sa
from tests.vision_states import random_state, style_adapter_shapes


def state(width=16, tokens=3, layers=2, context=12, seed=0, scale=0.2):
    out = random_state(style_adapter_shapes(width, tokens, layers, context), seed, scale)
    for key in out:
        if "ln_" in key and key.endswith(".weight"):  # LayerNorm gains
            out[key] = 1.0 + out[key]
    return out


def test_layout_detected_from_shapes():
    cfg = sa.detect_config(state(width=16, tokens=3, layers=2, context=12))
    assert cfg == sa.StyleConfig(width=16, tokens=3, layers=2, context_dim=12, heads=8)
    real = sa.detect_config({k: torch.empty(s, device="meta") for k, s in style_adapter_shapes(1024, 8, 3).items()})
    assert (real.width, real.tokens, real.layers, real.context_dim) == (1024, 8, 3, 768)


def test_residual_blocks_that_add_nothing_leave_the_style_tokens_alone():
    """With out_proj and c_proj zero, each block is the identity: the output is ln_post(ln_pre(e)) @ proj for the
    style embedding e, whatever the image. Computed by hand for e = (1, 2, ..., 8) in one token of width 8."""
    s = state(width=8, tokens=1, layers=1, context=2)
    for key in ("attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"):
        s[f"transformer_layes.0.{key}"] = torch.zeros_like(s[f"transformer_layes.0.{key}"])
    for ln in ("ln_pre", "ln_post"):
        s[f"{ln}.weight"], s[f"{ln}.bias"] = torch.ones(8), torch.zeros(8)
    s["style_embedding"] = torch.arange(1.0, 9.0).view(1, 1, 8)
    s["proj"] = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)  # sums of the first / last four entries
    model = sa.load_style_adapter(s)
    # LayerNorm of 1..8: mean 4.5, variance 5.25; once normalised (variance 1) a second LayerNorm changes it by eps only
    z = [(i - 4.5) / math.sqrt(5.25 + 1e-5) for i in range(1, 9)]
    z = [v / math.sqrt(sum(u * u for u in z) / 8 + 1e-5) for v in z]
    expected = torch.tensor([[[sum(z[:4]), sum(z[4:])]]])
    for image in (torch.randn(1, 5, 8), torch.zeros(1, 2, 8)):
        assert torch.allclose(model(image), expected, atol=1e-5)
    assert expected[0, 0, 0] < 0 < expected[0, 0, 1]


def reference_forward(s: dict, x: torch.Tensor, tokens: int, layers: int) -> torch.Tensor:
    """The original module's computation with torch's own MultiheadAttention (sequence-first) and LayerNorm."""
    width = s["style_embedding"].shape[-1]

    def ln(name, t):
        return nn.functional.layer_norm(t, (width,), s[f"{name}.weight"], s[f"{name}.bias"], 1e-5)

    h = torch.cat([x, s["style_embedding"].expand(x.shape[0], -1, -1)], 1)
    h = ln("ln_pre", h).permute(1, 0, 2)
    for i in range(layers):
        pre = f"transformer_layes.{i}."
        mha = nn.MultiheadAttention(width, 8)
        mha.load_state_dict(
            {
                "in_proj_weight": s[pre + "attn.in_proj_weight"],
                "in_proj_bias": s[pre + "attn.in_proj_bias"],
                "out_proj.weight": s[pre + "attn.out_proj.weight"],
                "out_proj.bias": s[pre + "attn.out_proj.bias"],
            }
        )
        a = ln(pre + "ln_1", h)
        h = h + mha(a, a, a, need_weights=False)[0]
        m = nn.functional.linear(ln(pre + "ln_2", h), s[pre + "mlp.c_fc.weight"], s[pre + "mlp.c_fc.bias"])
        m = m * torch.sigmoid(1.702 * m)
        h = h + nn.functional.linear(m, s[pre + "mlp.c_proj.weight"], s[pre + "mlp.c_proj.bias"])
    h = h.permute(1, 0, 2)
    return ln("ln_post", h[:, -tokens:]) @ s["proj"]


@torch.no_grad()
def test_matches_the_sequence_first_multihead_attention_formulation():
    s = state(width=16, tokens=3, layers=2, context=12, seed=3)
    model = sa.load_style_adapter(s)
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(1))
    got = model(x)
    assert got.shape == (2, 3, 12)
    assert torch.allclose(got, reference_forward(s, x, 3, 2), atol=1e-5)
    # The image tokens reach the style tokens only through attention (the MLP and LayerNorms act per token). The
    # perturbation must survive ln_pre, which removes a constant shift (or a scale) of a token, so it differs per
    # channel. Permuting the image tokens would not work either (no position embedding: attention is order-blind).
    # Rounding alone moves the output by ~1e-6 in float32; a real path moves it by tenths (0.41 / 0.32 here).
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    change = (model(x + noise) - got).abs().amax(dim=(1, 2))
    assert (change > 1e-2).all(), change  # every batch item, far above rounding


def test_strict_loading_errors_name_the_problem():
    s = state()
    with pytest.raises(ImgcondError, match=r"not a T2I-Adapter style model.*style_embedding"):
        sa.load_style_adapter({"redux_up.weight": torch.zeros(2, 2)}, source="x.safetensors")
    broken = dict(s)
    del broken["transformer_layes.1.mlp.c_fc.bias"]
    with pytest.raises(ImgcondError, match=r"missing transformer_layes\.1\.mlp\.c_fc\.bias"):
        sa.load_style_adapter(broken)
    broken = {**s, "transformer_layes.0.ln_1.weight": torch.ones(5)}
    with pytest.raises(ImgcondError, match="wrong shape"):
        sa.load_style_adapter(broken)
    with pytest.raises(ImgcondError, match="not divisible"):
        sa.detect_config(state(width=12))
    with pytest.raises(ImgcondError, match="takes"):
        sa.load_style_adapter(s)(torch.zeros(1, 4, 8))


def test_token_selection_keeps_the_class_token_and_masked_patches():
    hidden = torch.arange(10.0).view(1, 10, 1).expand(1, 10, 2)  # class + 3×3 patches
    mask = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 1.0]])
    got = sa.select_tokens(hidden, mask)
    assert got[0, :, 0].tolist() == [0.0, 2.0, 7.0, 9.0]
    assert sa.select_tokens(hidden, None) is hidden
    with pytest.raises(ImgcondError, match="does not fit"):
        sa.select_tokens(hidden, torch.ones(2, 2))


def test_attention_bias_is_log_strength_on_the_span():
    bias = sa.attention_bias(6, (3, 5), 2.0)
    assert bias.tolist()[:3] == [0.0] * 3 and bias[5] == 0
    assert torch.allclose(bias[3:5], torch.full((2,), math.log(2.0)))
    assert sa.attention_bias(4, (2, 4), 0.0)[2:].tolist() == [float("-inf")] * 2
    assert torch.equal(sa.attention_bias(4, (2, 4), 1.0), torch.zeros(4))
