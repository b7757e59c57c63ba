"""Redux control: projector loading, image preparation, token downsampling/masking/weighting, attention bias.

Reference vectors are those of seeds-algorithms.md §2.7 (numbered in the test names).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.redux.image import _autocrop_box, prepare
from lib_imgcond.redux.projector import ReduxProjector, encode_tokens, load_redux
from lib_imgcond.redux.tokens import (
    PRESETS,
    apply_weight,
    attention_bias,
    downsample,
    preset_tokens,
    select,
    token_count,
    token_mask,
)
from lib_imgcond.vision.config import VisionConfig
from lib_imgcond.vision.transformer import VisionTransformer, preprocess

D = 6


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tokens(b: int = 1, n: int = 729, seed: int = 0) -> torch.Tensor:
    return rand(b, n, D, seed=seed)


def grid_of(t: torch.Tensor) -> torch.Tensor:
    side = math.isqrt(t.shape[1])
    return t.reshape(t.shape[0], side, side, -1)


# ----------------------------------------------------------------------------------------------- projector


def test_v7_mlp_shapes_full_size_on_meta():
    with torch.device("meta"):
        proj = ReduxProjector()
        x = torch.empty(1, 729, 1152)
        assert proj.redux_up(x).shape == (1, 729, 12288)
        assert proj(x).shape == (1, 729, 4096)
    assert sum(p.numel() for p in proj.parameters()) == 64_503_808
    assert (proj.in_features, proj.out_features) == (1152, 4096)


def redux_sd(i: int = 8, m: int = 16, o: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "redux_up.weight": rand(m, i, seed=seed),
        "redux_up.bias": rand(m, seed=seed + 1),
        "redux_down.weight": rand(o, m, seed=seed + 2),
        "redux_down.bias": rand(o, seed=seed + 3),
    }


def test_load_redux_round_trip(tmp_path):
    sd = redux_sd()
    path = tmp_path / "flux1-redux-tiny.safetensors"
    save_file(sd, str(path))
    proj = load_redux(load_file(str(path)), source=path.name)
    assert (proj.in_features, proj.redux_up.out_features, proj.out_features) == (8, 16, 12)
    assert not any(p.requires_grad for p in proj.parameters())
    x = rand(2, 5, 8, seed=9)
    expected = (
        F.silu(x @ sd["redux_up.weight"].T + sd["redux_up.bias"]) @ sd["redux_down.weight"].T + sd["redux_down.bias"]
    )
    torch.testing.assert_close(proj(x), expected)
    assert load_redux(sd, dtype=torch.bfloat16).redux_up.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("sd", "message"),
    [
        ({"style_embedding": torch.zeros(1, 8, 768), "conv_in.weight": torch.zeros(4)}, "T2I-Adapter style model"),
        ({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2)}, "vision encoder"),
        ({"redux_down.weight": torch.zeros(12, 16), "redux_down.bias": torch.zeros(12)}, "missing"),
        ({**redux_sd(), "extra": torch.zeros(1)}, "unexpected"),
        ({**redux_sd(), "redux_down.weight": torch.zeros(12, 15)}, "inconsistent"),
    ],
)
def test_load_redux_wrong_files(sd, message):
    with pytest.raises(ImgcondError, match=message) as info:
        load_redux(sd, source="wrong.safetensors")
    assert "wrong.safetensors" in str(info.value)
    assert "flux1-redux-dev.safetensors" in str(info.value)


def tiny_siglip(hidden: int = 32) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = VisionConfig("siglip", hidden, 2, 1, 64, 42, 14, None, "gelu_tanh", "tiny-siglip")
    return VisionTransformer(cfg).eval()


def test_encode_tokens_shapes_and_values():
    vision, proj = tiny_siglip(), ReduxProjector(32, 16, 8)
    images = torch.rand(2, 3, 42, 42, generator=torch.Generator().manual_seed(4))
    out = encode_tokens(vision, proj, images)
    assert out.shape == (2, 9, 8)
    with torch.no_grad():
        expected = proj(vision(preprocess(images, vision.config)).last_hidden_state)
    torch.testing.assert_close(out, expected)
    assert encode_tokens(vision, proj, images[0]).shape == (1, 9, 8)


def test_encode_tokens_errors():
    vision = tiny_siglip()
    with pytest.raises(ImgcondError, match="expects 24-dim"):
        encode_tokens(vision, ReduxProjector(24, 16, 8), torch.rand(1, 3, 42, 42))
    with pytest.raises(ArgumentError, match="prepared_image"):
        encode_tokens(vision, ReduxProjector(32, 16, 8), torch.rand(1, 3, 40, 40))
    cfg = VisionConfig("clip", 32, 1, 1, 64, 42, 14, 16, "gelu", "tiny-clip")
    with pytest.raises(ImgcondError, match="needs a SigLIP"):
        encode_tokens(VisionTransformer(cfg), ReduxProjector(32, 16, 8), torch.rand(1, 3, 42, 42))


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


# ----------------------------------------------------------------------------------------------- preparation


def test_v4_keep_aspect_letterbox_tokens():
    image = torch.rand(3, 500, 1000, generator=torch.Generator().manual_seed(5))
    img, mask = prepare(image, None, "keep_aspect")
    assert img.shape == (3, 384, 384)
    assert mask.shape == (384, 384)
    rows = torch.nonzero(mask.sum(1) > 0).flatten()
    assert (rows.min().item(), rows.max().item()) == (96, 287)
    torch.testing.assert_close(mask[96:288], torch.ones(192, 384))
    assert torch.all(img[:, :96] == 0)
    assert torch.all(img[:, 288:] == 0)
    assert img.min() >= 0 and img.max() <= 1

    tm = token_mask(mask, 14)
    assert tm.shape == (27, 27)
    in_rows = torch.nonzero(tm.sum(1) > 0).flatten().tolist()
    assert in_rows == list(range(6, 21))
    t = tokens()
    assert select(*downsample(t, 1, "area", tm)).shape == (1, 405, D)
    assert select(*downsample(t, 3, "area", tm)).shape == (1, 45, D)
    assert token_count(1, "area", tm) == 405
    assert token_count(3, "bicubic", tm) == 45


def test_v5_center_crop_offsets():
    image = torch.rand(3, 512, 768, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(512, 768)
    mask[:, 128:640] = 1.0  # → columns 96..479 after scaling by 0.75, exactly the crop window
    img, m = prepare(image, mask, "center_crop")
    resized = F.interpolate(image[None], size=(384, 576), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(img, resized[0].clamp(0, 1)[:, :, 96:480])
    assert m.shape == (384, 384)
    assert torch.all(m[:, 2:382] > 0.99)
    img2, m2 = prepare(image, None, "center_crop")
    assert m2 is None
    torch.testing.assert_close(img2, img)


def test_v5_autocrop_box():
    mask = torch.zeros(1000, 1000)
    mask[500, 500] = 1.0
    assert _autocrop_box(mask, 0.1, 384) == (308, 308, 692, 692)
    image = torch.rand(3, 1000, 1000, generator=torch.Generator().manual_seed(7))
    img, m = prepare(image, mask, "autocrop", margin=0.1)
    assert torch.equal(img, image[:, 308:692, 308:692])  # 384² box: no rescale
    assert m.shape == (384, 384)
    assert m[192, 192] == 1.0
    assert m.sum() == 1.0


def test_autocrop_pushes_against_borders_and_fits_small_images():
    mask = torch.zeros(1000, 1000)
    mask[10, 990] = 1.0
    assert _autocrop_box(mask, 0.0, 384) == (616, 0, 1000, 384)
    small = torch.zeros(200, 300)
    small[50:60, 50:60] = 1.0
    assert _autocrop_box(small, 0.1, 384) == (0, 0, 300, 200)
    img, m = prepare(torch.rand(3, 200, 300), small, "autocrop")
    assert img.shape == (3, 384, 384)
    assert m.shape == (384, 384)
    big = torch.zeros(1000, 1000)
    big[100:900, 200:300] = 1.0
    x0, y0, x1, y1 = _autocrop_box(big, 0.0, 384)
    assert (x1 - x0, y1 - y0) == (799, 799)


def test_v7_mask_in_last_six_columns_selects_nothing():
    image = torch.rand(3, 384, 384)
    mask = torch.zeros(384, 384)
    mask[:, 378:] = 1.0
    img, m = prepare(image, mask, "center_crop")
    assert torch.equal(img, image)
    tm = token_mask(m, 14)
    assert tm.shape == (27, 27)
    assert tm.sum() == 0
    assert select(tokens(), tm).shape == (1, 0, D)
    assert token_count(1, "area", tm) == 0
    assert token_count(3, "area", tm) == 0


def test_mask_outside_the_crop_window_but_ringing_into_it_selects_nothing():
    """500×300, centre crop, mask rows H/4..H/2 × columns W−W/5..W: bicubic ringing leaves ~0.09 in the crop's last
    pixel columns, which no patch of the 27×14 grid covers. Judged on pixels the mask looks non-empty; judged on the
    token mask that is used (patch given) it selects nothing and is refused."""
    width, height = 500, 300
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(height, width)
    mask[height // 4 : height // 2, width - width // 5 : width] = 1.0
    _img, m = prepare(image, mask, "center_crop")  # pixel check only (the old, silent behaviour)
    assert 0.05 < float(m[:, 378:].max()) < 0.2 and float(m[:, :378].max()) == 0.0
    assert token_mask(m, 14).sum() == 0
    with pytest.raises(ImgcondError, match=r"selects no token: it is outside the centre-crop window.*last 6 pixel"):
        prepare(image, mask, "center_crop", patch=14)
    inside = torch.zeros(height, width)
    inside[height // 4 : height // 2, width // 2 : width // 2 + 20] = 1.0  # inside the window: still accepted
    _img, m = prepare(image, inside, "center_crop", patch=14)
    assert token_mask(m, 14).sum() > 0
    with pytest.raises(ArgumentError, match="patch"):
        prepare(image, mask, "center_crop", patch=0)


def test_mask_errors():
    image = torch.rand(3, 500, 1000)
    with pytest.raises(ImgcondError, match="autocrop needs a mask"):
        prepare(image, None, "autocrop")
    with pytest.raises(ImgcondError, match="empty"):
        prepare(image, torch.zeros(500, 1000), "keep_aspect")
    with pytest.raises(ImgcondError, match=r"999×500 pixels but the image is 1000×500"):
        prepare(image, torch.ones(500, 999), "center_crop")
    outside = torch.zeros(500, 1000)
    outside[:, :50] = 1.0  # the centre crop keeps columns 250..749
    with pytest.raises(ImgcondError, match="outside the centre-crop window"):
        prepare(image, outside, "center_crop")
    with pytest.raises(ArgumentError, match="image"):
        prepare(torch.rand(500, 1000), None, "keep_aspect")


@pytest.mark.parametrize("mode", ["center_crop", "keep_aspect", "autocrop"])
def test_prepared_mask_has_one_shape(mode):
    image = torch.rand(3, 300, 500)
    mask = torch.zeros(1, 300, 500)  # a leading 1 is accepted
    mask[0, 100:200, 200:300] = 1.0
    img, m = prepare(image, mask, mode, size=56)
    assert img.shape == (3, 56, 56)
    assert m.shape == (56, 56)
    assert img.dtype == m.dtype == torch.float32
    assert m.min() >= 0 and m.max() <= 1


def test_patch16_size_512():
    _img, m = prepare(torch.rand(3, 600, 800), None, "keep_aspect", size=512)
    tm = token_mask(m, 16)
    assert tm.shape == (32, 32)
    assert token_count(3, "area", tm, grid=32) == select(*downsample(tokens(n=1024), 3, "area", tm)).shape[1]


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
