"""Redux control: token downsampling/masking/weighting and the attention bias (projector and image preparation: the
test_redux_projector.py and test_redux_image.py files).

Reference vectors are those of seeds-algorithms.md §2.7 (numbered in the test names).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.redux.image import prepare
from lib_imgcond.redux.tokens import (
    PRESETS,
    apply_weight,
    attention_bias,
    downsample,
    preset_tokens,
    select,
    token_count,
)
from tests.redux_tensors import D, grid_of, rand, tokens

# ----------------------------------------------------------------------------------------------- downsampling


def test_v1_factor_3_area_is_block_mean_and_interpolators_pick_tokens():
    t = tokens()
    g = grid_of(t)[0]
    blocks = g.reshape(9, 3, 9, 3, D)
    out, _ = downsample(t, 3, "area")
    torch.testing.assert_close(grid_of(out)[0], blocks.mean(dim=(1, 3)))
    for mode in ("bicubic", "bilinear", "nearest-exact"):
        out, _ = downsample(t, 3, mode)
        torch.testing.assert_close(grid_of(out)[0], g[1::3, 1::3], atol=1e-5, rtol=0)
    out, _ = downsample(t, 3, "nearest")
    assert torch.equal(grid_of(out)[0], g[0::3, 0::3])
    assert torch.equal(grid_of(preset_tokens(t, "medium"))[0], grid_of(downsample(t, 3, "area")[0])[0])


def test_v2_preset_token_counts():
    t = tokens()
    counts = {name: preset_tokens(t, name).shape[1] for name in PRESETS}
    assert counts == {"highest": 729, "high": 169, "medium": 81, "low": 36, "lowest": 25}
    assert preset_tokens(t, "highest") is t
    g = grid_of(t).permute(0, 3, 1, 2)
    high = F.interpolate(g, size=(13, 13), mode="bicubic", align_corners=False)
    torch.testing.assert_close(grid_of(preset_tokens(t, "high")), high.permute(0, 2, 3, 1))


@pytest.mark.parametrize(
    ("factor", "count"),
    [(1, 729), (1.5, 324), (2, 196), (2.5, 121), (3, 81), (4, 49), (5, 25), (6, 16), (9, 9)],
)
@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic", "area", "nearest-exact"])
def test_v2_advanced_token_counts(factor, count, mode):
    out, tm = downsample(tokens(), factor, mode)
    assert out.shape == (1, count, D)
    assert tm is None
    assert token_count(factor, mode) == count


def test_v2_area_windows_overlap():
    t = tokens()
    g = grid_of(t)[0]
    out = grid_of(downsample(t, 2, "area")[0])[0]
    for i, (a, b) in enumerate([(0, 2), (1, 4), (3, 6), (5, 8)]):
        torch.testing.assert_close(out[i, 0], g[a:b, 0:2].mean(dim=(0, 1)))


def test_several_images_downsample_per_image():
    t = tokens(3)
    ops = [
        lambda x: preset_tokens(x, "medium"),
        lambda x: preset_tokens(x, "low"),
        lambda x: downsample(x, 2.5, "bicubic")[0],
    ]
    for op, count in zip(ops, (81, 36, 121), strict=True):
        out = op(t)
        assert out.shape == (3, count, D)
        for i in range(3):
            torch.testing.assert_close(out[i : i + 1], op(t[i : i + 1]))
    flattened = t.reshape(1, 3 * 729, D)  # what the original node did with two or more images
    with pytest.raises(ImgcondError, match="square grid"):
        preset_tokens(flattened, "medium")
    with pytest.raises(ImgcondError, match="one image per batch row"):
        downsample(flattened[:, : 2 * 729], 3, "area")


def test_bf16_tokens_keep_their_dtype():
    out, _ = downsample(tokens().bfloat16(), 3, "bicubic")
    assert out.dtype == torch.bfloat16


def test_v3_weight_squares():
    t = tokens()
    assert torch.equal(apply_weight(t, 0.5), t * 0.25)
    assert torch.equal(apply_weight(t, 1.0), t)
    with pytest.raises(ArgumentError, match="weight"):
        apply_weight(t, -0.1)
    with pytest.raises(ArgumentError, match="weight"):
        apply_weight(t, float("nan"))


def test_soft_mask_multiplies_before_interpolation_and_only_selects_at_factor_1():
    t = tokens()
    tm = torch.zeros(27, 27)
    tm[:, :13] = 0.5
    out, small = downsample(t, 3, "area", tm)
    expected = (grid_of(t)[0] * tm[..., None]).reshape(9, 3, 9, 3, D).mean(dim=(1, 3))
    torch.testing.assert_close(grid_of(out)[0], expected)
    torch.testing.assert_close(small, tm.reshape(9, 3, 9, 3).mean(dim=(1, 3)))
    assert select(out, small).shape == (1, 9 * 5, D)  # block columns 0..4 touch the mask
    assert token_count(3, "area", tm) == 45

    same, tm1 = downsample(t, 1, "area", tm)
    assert same is t
    assert tm1 is tm
    picked = select(same, tm1)
    assert picked.shape == (1, 27 * 13, D)
    assert torch.equal(picked, grid_of(t)[:, :, :13].reshape(1, -1, D))  # raster order, not scaled by 0.5
    assert token_count(1, "area", tm) == 27 * 13


def test_argument_validation():
    t = tokens()
    for bad in (0.5, 9.5, float("nan"), "3", True):
        with pytest.raises(ArgumentError, match="factor"):
            downsample(t, bad, "area")
    with pytest.raises(ArgumentError, match="mode"):
        downsample(t, 3, "cubic")
    with pytest.raises(ArgumentError, match="preset"):
        preset_tokens(t, "max")
    with pytest.raises(ArgumentError, match="tmask"):
        downsample(t, 3, "area", torch.ones(9, 9))
    with pytest.raises(ArgumentError, match="tmask"):
        select(t, torch.ones(9, 9))
    with pytest.raises(ArgumentError, match="mode"):
        prepare(torch.rand(3, 8, 8), mode="squash")


# ----------------------------------------------------------------------------------------------- attention bias


def test_attention_bias_values():
    n_txt, n_img, span = 256 + 81, 64, (256, 337)
    ones = attention_bias(n_txt, n_img, [span], 1.0)
    assert ones.shape == (1, 1, 1, n_txt + n_img)
    assert torch.equal(ones, torch.zeros_like(ones))

    half = attention_bias(n_txt, n_img, [span], 0.5)
    assert torch.all(half[..., 256:337] == math.log(0.5))
    assert torch.all(half[..., :256] == 0)
    assert torch.all(half[..., 337:] == 0)

    off = attention_bias(n_txt, n_img, [span], 0.0)
    assert torch.all(torch.isneginf(off[..., 256:337]))
    assert torch.isfinite(off[..., :256]).all()
    assert torch.isfinite(off[..., 337:]).all()
    logits = rand(2, 3, n_txt + n_img, n_txt + n_img)
    w = torch.softmax(logits + off, dim=-1)
    assert not torch.isnan(w).any()
    assert torch.all(w[..., 256:337] == 0)
    q = rand(1, 2, n_txt + n_img, 8, seed=1)
    k, v = rand(1, 2, n_txt + n_img, 8, seed=2), rand(1, 2, n_txt + n_img, 8, seed=3)
    keep = torch.cat([torch.arange(256), torch.arange(337, n_txt + n_img)])
    with_bias = F.scaled_dot_product_attention(q, k, v, attn_mask=off)
    without = F.scaled_dot_product_attention(q, k[:, :, keep], v[:, :, keep])
    torch.testing.assert_close(with_bias, without, atol=1e-5, rtol=1e-5)

    two = attention_bias(100, 10, [(10, 20), (50, 60)], [2.0, 0.0], dtype=torch.float16)
    assert two.dtype == torch.float16
    assert torch.all(two[..., 10:20] == torch.tensor(math.log(2.0), dtype=torch.float16))
    assert torch.all(torch.isneginf(two[..., 50:60]))


def test_attention_bias_errors():
    with pytest.raises(ImgcondError, match="nothing to attend"):
        attention_bias(10, 0, [(0, 10)], 0.0)
    with pytest.raises(ArgumentError, match="redux_spans"):
        attention_bias(10, 5, [(0, 6), (5, 8)], 0.5)
    with pytest.raises(ArgumentError, match="redux_spans"):
        attention_bias(10, 5, [(8, 12)], 0.5)
    with pytest.raises(ArgumentError, match="strength"):
        attention_bias(10, 5, [(0, 4)], -1.0)
    with pytest.raises(ArgumentError, match="strength"):
        attention_bias(10, 5, [(0, 4), (4, 6)], [0.5])
    assert attention_bias(10, 5, [], 0.0).abs().sum() == 0
