"""Unit tests for lib_imgcond.flexdiffuse.guidance (CPU, small tensors)."""

from __future__ import annotations

import re

import pytest
import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.flexdiffuse import guidance as fd
from lib_imgcond.flexdiffuse import image, matching, params
from tests.flex_reference import T, _rand, ref_concept, ref_guide

# --------------------------------------------------------------------------------------------------
# Whole conditionings


@pytest.mark.parametrize("compatible", [False, True])
def test_multi_chunk_equals_per_chunk(compatible):
    x = _rand(2, 2 * T, 24, seed=21)
    img = _rand(40, 24, seed=22)
    p = params.FlexParams(compatible=compatible)
    out = fd.guide_chunks(x, [(img, 1.0)], p)
    first = fd.guide_chunks(x[:, :T], [(img, 1.0)], p)
    second = fd.guide_chunks(x[:, T:], [(img, 1.0)], p)
    assert torch.equal(out, torch.cat([first, second], dim=1))


@pytest.mark.parametrize("compatible", [False, True])
@pytest.mark.parametrize("n_images", [1, 2])
def test_all_multipliers_zero_is_identity(compatible, n_images):
    x = _rand(2, 2 * T, 24, seed=23)
    images = [(_rand(40, 24, seed=24 + j), 0.7 + j) for j in range(n_images)]
    p = params.FlexParams(threshold_mult=0, linear_start=0, linear_end=0, clustered=0, compatible=compatible)
    assert p.multipliers_zero
    assert torch.equal(fd.guide_chunks(x, images, p), x)
    assert torch.equal(fd.guide_chunks(x.half(), images, p), x.half())
    # the tween itself keeps everything when all weights are 0 (no shortcut involved)
    txt, img = x[0, :T], images[0][0]
    idx, score = matching.map_embeddings(img, txt, compatible=compatible)
    w = matching.slot_weights(score, p)
    assert torch.all(w == 0)
    assert torch.equal(fd.tween(txt, img, idx, score, w, p.max_guidance, compatible=compatible), txt)


def test_no_images_or_zero_weight_is_identity():
    x = _rand(1, T, 24, seed=26)
    assert torch.equal(fd.guide_chunks(x, [], params.FlexParams()), x)
    assert torch.equal(fd.guide_chunks(x, [(_rand(40, 24), 0.0)], params.FlexParams()), x)


def test_several_images_combine_linearly():
    x = _rand(1, T, 24, seed=27)
    a, b = _rand(40, 24, seed=28), _rand(30, 24, seed=29)
    p = params.FlexParams()
    ga = fd.guide_chunks(x, [(a, 1.0)], p)
    gb = fd.guide_chunks(x, [(b, 1.0)], p)
    out = fd.guide_chunks(x, [(a, 0.5), (b, 0.25)], p)
    torch.testing.assert_close(out, x + 0.5 * (ga - x) + 0.25 * (gb - x))


def test_dimension_mismatch_error():
    x = _rand(1, T, 768)
    img = _rand(257, 1024)
    with pytest.raises(
        ImgcondError, match=re.escape("1024-d but the text embedding is 768-d: pick the ViT-L/14 encoder for SD1.5")
    ):
        fd.guide_chunks(x, [(img, 1.0)], params.FlexParams())
    with pytest.raises(ImgcondError, match="1280-d but the text embedding is 768-d"):
        matching.map_embeddings(_rand(10, 1280), _rand(T, 768))


def test_bad_inputs_raise_clear_errors():
    p = params.FlexParams()
    img = _rand(40, 24)
    with pytest.raises(ImgcondError, match="multiple of 77"):
        fd.guide_chunks(_rand(1, 80, 24), [(img, 1.0)], p)
    bad = _rand(1, T, 24)
    bad[0, 3, 0] = float("nan")
    with pytest.raises(ImgcondError, match="NaN"):
        fd.guide_chunks(bad, [(img, 1.0)], p)
    with pytest.raises(ArgumentError):
        fd.guide_chunks(_rand(1, T, 24), [(img, 1.0)], params.FlexParams(max_guidance=3.0))
    with pytest.raises(ArgumentError):
        matching.map_embeddings(img, _rand(T, 24), priority="align")


def test_zero_vectors_do_not_give_nan():
    txt = _rand(T, 24, seed=30)
    txt[40:] = 0.0
    img = _rand(40, 24, seed=31)
    img[3] = 0.0
    out = fd.guide_chunks(txt, [(img, 1.0)], params.FlexParams())
    assert torch.isfinite(out).all()


def test_half_precision_input_keeps_dtype():
    x = _rand(1, T, 24, seed=32).half()
    img = _rand(40, 24, seed=33).half()
    out = fd.guide_chunks(x, [(img, 1.0)], params.FlexParams())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_sdxl_split_join():
    cond = _rand(2, 2 * T, 2048, seed=34)
    lpart, gpart = fd.split_sdxl(cond)
    assert lpart.shape == (2, 2 * T, 768) and gpart.shape == (2, 2 * T, 1280)
    assert torch.equal(fd.join_sdxl(lpart, gpart), cond)
    with pytest.raises(ImgcondError):
        fd.split_sdxl(_rand(1, T, 768))
    with pytest.raises(ImgcondError):
        fd.join_sdxl(gpart, lpart)
    guided = fd.guide_chunks(gpart, [(_rand(20, 1280, seed=35), 1.0)], params.FlexParams())
    assert fd.join_sdxl(lpart, guided).shape == cond.shape


# --------------------------------------------------------------------------------------------------
# Concepts, direct guidance, preprocessing


def _concept_data():
    base = _rand(T, 24, seed=40)
    img = _rand(100, 24, seed=41)  # ≥ 76 image tokens: every concept token gets one (no reuse)
    concept = _rand(T, 24, seed=42)
    concept[1] = base[5] + 0.01 * _rand(24, seed=43)  # concept token 1 ≈ prompt token 5
    concept[2] = base[9] + 0.01 * _rand(24, seed=44)  # concept token 2 ≈ prompt token 9
    return base, concept, img


def test_concept_map_matches_reference_and_both_modes_agree():
    base, concept, img = _concept_data()
    tweened = fd.guide_chunks(base, [(img, 1.0)], params.FlexParams(compatible=True))
    expected = ref_concept(base, concept, img, tweened, 0.9)
    got = fd.concept_map(base, concept, img, 0.9, out=tweened, compatible=True)
    assert torch.equal(got, expected)
    changed = (got != tweened).any(dim=1).nonzero().flatten().tolist()
    assert 5 in changed and 9 in changed
    assert torch.equal(fd.concept_map(base, concept, img, 0.9, out=tweened), got)
    assert torch.equal(fd.concept_map(base, concept, img, 0.9), ref_concept(base, concept, img, base, 0.9))


def test_concept_map_unmatched_concept_token_differs_by_mode():
    base, concept, img = _concept_data()
    img = img[:60]  # 60 image tokens for 76 concept tokens: the last concept tokens get none
    concept[74] = base[76] + 0.01 * _rand(24, seed=45)  # concept token 74 ≈ prompt token 76
    compat = fd.concept_map(base, concept, img, 0.9, compatible=True)
    assert torch.equal(compat, ref_concept(base, concept, img, base, 0.9))
    assert torch.equal(compat[76], img[0])  # the original falls back to image token 0
    corrected = fd.concept_map(base, concept, img, 0.9)
    assert torch.equal(corrected[76], base[76])  # corrected mode skips the unmatched concept token
    for t in (corrected != compat).any(dim=1).nonzero().flatten().tolist():  # only such fall-backs differ
        assert torch.equal(compat[t], img[0]) and torch.equal(corrected[t], base[t])


def test_guide_chunks_with_concept():
    base, concept, img = _concept_data()
    p = params.FlexParams(compatible=True)
    out = fd.guide_chunks(base.unsqueeze(0), [(img, 1.0)], p, concept=concept.unsqueeze(0))
    expected, _, _ = ref_guide(base, img, p)
    expected = ref_concept(base, concept, img, expected, 0.9)
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=1e-5)
    # concepts still apply with all multipliers at 0
    p0 = params.FlexParams(threshold_mult=0, linear_start=0, linear_end=0, clustered=0)
    out0 = fd.guide_chunks(base, [(img, 1.0)], p0, concept=concept)
    assert not torch.equal(out0, base)


def test_direct_guidance():
    img = _rand(257, 32, seed=50)
    header = _rand(32, seed=51)
    out = fd.direct_guidance(img, header)
    assert out.shape == (T, 32)
    assert torch.equal(out[1:], img[1:T])
    torch.testing.assert_close(out[0], img[0] + 0.85 * (header - img[0]))
    torch.testing.assert_close(out[0], 0.15 * img[0] + 0.85 * header)
    with pytest.raises(ImgcondError):
        fd.direct_guidance(img[:50], header)
    with pytest.raises(ImgcondError):
        fd.direct_guidance(img, _rand(16))


def test_normalize_image():
    mean = torch.tensor(params.CLIP_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(params.CLIP_STD).reshape(1, 3, 1, 1)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(52))
    torch.testing.assert_close(image.normalize_image(x), (x - mean) / std)
    torch.testing.assert_close(image.normalize_image(mean.expand(1, 3, 4, 4)), torch.zeros(1, 3, 4, 4))
    torch.testing.assert_close(image.normalize_image_compat(x), (2 * x - 1 - mean) / std)
    half = torch.full((1, 3, 2, 2), 0.5)
    torch.testing.assert_close(image.normalize_image_compat(half), (-mean / std).expand(1, 3, 2, 2))
    with pytest.raises(ImgcondError):
        image.normalize_image(torch.rand(1, 4, 8, 8))
    with pytest.raises(ImgcondError):
        image.normalize_image(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
