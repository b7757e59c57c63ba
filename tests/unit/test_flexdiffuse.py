"""Unit tests for lib_imgcond.flexdiffuse.guidance (CPU, small tensors)."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.flexdiffuse import guidance as fd
from lib_imgcond.flexdiffuse import image, matching, params

T = 77


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


# --------------------------------------------------------------------------------------------------
# A plain step-by-step rendering of §4.2–4.3 (original, shifted slots), written as simple loops.


def ref_map(img, txt, reuse, priority):
    """Table of (image index, score) per slot; slot k holds text token k + 1, the last slot stays (0, 0)."""
    a = img / img.norm(dim=-1, keepdim=True)
    b = txt / txt.norm(dim=-1, keepdim=True)
    n_txt = txt.shape[0]
    candidates = []
    for i in range(img.shape[0]):
        logits = 100.0 * (a[i : i + 1] @ b.t())
        probs = logits.softmax(dim=-1)[0]
        for tok in range(1, n_txt):
            candidates.append((i, tok - 1, float(probs[tok])))
    table = [(0, 0.0)] * n_txt
    if priority == "direct":
        for i, slot, s in candidates:
            if i == slot:
                table[slot] = (i, s)
        return table
    if priority == "text_order":
        candidates.sort(key=lambda c: (c[1], -c[2], c[0]))
    else:
        candidates.sort(key=lambda c: (-c[2], c[1], c[0]))
    used = set()
    for i, slot, s in candidates:
        if table[slot][1] > 0 or i in used:
            continue
        table[slot] = (i, s)
        if not reuse:
            used.add(i)
    return table


def ref_blend(a, b):
    if a.max() >= 0:
        return torch.maximum(a, b) if b.max() >= 0 else a + b
    return torch.minimum(a, b)


def ref_weights(scores, p):
    n = len(scores)
    avg = sum(scores) / n
    w = torch.linspace(p.linear_start, p.linear_end, n)
    if p.clustered != 0:
        peaks = [
            t for t in range(1, n - 1) if scores[t] >= avg and scores[t - 1] <= scores[t] and scores[t] >= scores[t + 1]
        ]
        if peaks:
            valleys = [0] + [p1 + math.ceil((p2 - p1) / 2) for p1, p2 in itertools.pairwise(peaks)] + [n - 1]
            # tent = linear interpolation through valley, peak, valley, peak, …, valley
            xs, ys = [valleys[0]], [0.0]
            for k, pk in enumerate(peaks):
                xs += [pk, valleys[k + 1]]
                ys += [1.0, 0.0]
            tent = torch.tensor(np.interp(np.arange(n), xs, ys), dtype=torch.float32)
            w = ref_blend(w, tent * p.clustered)
    if p.threshold_mult != 0:
        th = torch.tensor([p.threshold_mult if s >= p.threshold_floor else 0.0 for s in scores], dtype=torch.float32)
        w = ref_blend(w, th)
    if p.header_max < 1:
        h = float(w[0])
        w[0] = min(h, p.header_max) if h >= 0 else max(h, -p.header_max)
    return w


def ref_tween(txt, img, table, w, max_guidance):
    out = torch.zeros_like(txt)
    for t, (i, s) in enumerate(table):
        iw = min(float(w[t]), max_guidance)
        if iw == 0:
            out[t] = txt[t]
        elif abs(iw) >= 1.0 - s:
            out[t] = img[i]
        else:
            out[t] = txt[t] + (img[i] - txt[t]) * iw
    return out


def ref_concept(base, concept, img, out, threshold):
    concept_table = ref_map(img, concept, reuse=False, priority="text_order")
    base_table = ref_map(concept, base, reuse=True, priority="best_fit")
    out = out.clone()
    for tok, (c, s) in enumerate(base_table, 1):
        if c - 1 < 0:
            continue
        if s > threshold:
            out[tok] = img[concept_table[c - 1][0]]
    return out


def ref_guide(txt, img, p):
    table = ref_map(img, txt, p.reuse, p.priority)
    w = ref_weights([s for _, s in table], p)
    return ref_tween(txt, img, table, w, p.max_guidance), table, w


# --------------------------------------------------------------------------------------------------
# Parameters


def test_defaults_and_validate_ok():
    p = params.FlexParams()
    assert (p.threshold_mult, p.threshold_floor, p.linear_start, p.linear_end) == (0.25, 0.75, 0.1, 0.5)
    assert (p.clustered, p.max_guidance, p.header_max, p.priority) == (0.15, 0.35, 0.0, "best_fit")
    assert (p.reuse, p.concept_threshold, p.compatible) == (True, 0.9, False)
    assert p.validate() is p
    assert not p.multipliers_zero


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold_mult", 1.5),
        ("threshold_mult", -1.01),
        ("linear_start", -2.0),
        ("linear_end", 1.2),
        ("clustered", 0.6),
        ("clustered", -0.51),
        ("max_guidance", -0.1),
        ("max_guidance", 1.1),
        ("header_max", 2.0),
        ("threshold_floor", -0.2),
        ("concept_threshold", 1.5),
        ("max_guidance", float("nan")),
        ("clustered", "0.1"),
        ("linear_end", True),
        ("priority", "optimal"),
        ("reuse", 1),
        ("compatible", "yes"),
    ],
)
def test_validate_errors(field, value):
    p = params.FlexParams(**{field: value})
    with pytest.raises(ArgumentError) as info:
        p.validate()
    assert info.value.name == field
    assert isinstance(info.value, ImgcondError)


def test_validate_error_message_names_range():
    with pytest.raises(ArgumentError, match=r"-0\.5 to 0\.5"):
        params.FlexParams(clustered=0.9).validate()


# --------------------------------------------------------------------------------------------------
# §4.5 reference vectors


def _vector1_tensors(peak_token):
    dim = 80
    img = torch.zeros(1, dim, dtype=torch.float64)
    img[0, 0] = 1.0
    txt = torch.zeros(T, dim, dtype=torch.float64)
    for t in range(T):
        c = 0.30 if t == peak_token else 0.25
        txt[t, 0] = c
        txt[t, t + 1] = math.sqrt(1 - c * c)
    return img, txt


def test_vector1_softmax_score():
    expected = 1.0 / (1.0 + 76.0 * math.exp(-5.0))
    assert expected == pytest.approx(0.66134, abs=1e-5)
    img, txt = _vector1_tensors(peak_token=30)
    s = params.similarity_scores(img, txt)
    assert float(s[0, 30]) == pytest.approx(expected, abs=1e-9)
    _, score = matching.map_embeddings(img, txt)  # corrected: slot 30 ↔ text token 30
    assert float(score[30]) == pytest.approx(expected, abs=1e-9)
    idx_c, score_c = matching.map_embeddings(img, txt, compatible=True)  # original: slot 29 ↔ text token 30
    assert float(score_c[29]) == pytest.approx(expected, abs=1e-9)
    assert float(score_c[76]) == 0.0
    assert int(idx_c[76]) == 0
    assert float(score[0]) == 0.0


def test_vector2_tent():
    s = torch.full((T,), 0.01)
    s[10], s[20] = 0.9, 0.8
    assert matching.cluster_peaks(s) == [(10, 10), (20, 20)]
    tent = matching.cluster_tent(s)
    expected = [k / 10 for k in range(10)] + [1.0, 0.8, 0.6, 0.4, 0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    expected += [1 - k / 56 for k in range(1, 57)]
    assert len(expected) == T
    torch.testing.assert_close(tent, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)
    p = params.FlexParams(threshold_mult=0, linear_start=0, linear_end=0, clustered=0.5, header_max=1.0)
    w = matching.slot_weights(s, p)
    torch.testing.assert_close(w, 0.5 * torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


@pytest.mark.parametrize("compatible", [False, True])
def test_vector3_tween_rule(compatible):
    txt = _rand(4, 8, seed=1)
    img = _rand(3, 8, seed=2)
    idx = torch.tensor([0, 1, 2, 0])
    scores = torch.tensor([0.9, 0.7, 0.5, 0.5])
    weights = torch.tensor([0.0, 0.35, 0.35, -0.8])
    out = fd.tween(txt, img, idx, scores, weights, 0.35, compatible=compatible)
    assert torch.equal(out[0], txt[0])  # iw == 0: keep
    assert torch.equal(out[1], img[1])  # 1 - 0.7 = 0.3 ≤ 0.35: replace
    torch.testing.assert_close(out[2], txt[2] + 0.35 * (img[2] - txt[2]))
    assert torch.equal(out[3], img[0])  # |-0.8| ≥ 0.5: replace, not repulsion


def test_vector3_negative_weight_below_threshold_repels():
    txt = _rand(2, 8, seed=3)
    img = _rand(1, 8, seed=4)
    out = fd.tween(txt, img, torch.tensor([0, 0]), torch.tensor([0.0, 0.2]), torch.tensor([0.0, -0.3]), 0.35)
    torch.testing.assert_close(out[1], txt[1] - 0.3 * (img[0] - txt[1]))


@pytest.mark.parametrize("compatible", [False, True])
def test_vector4_linear_cap_and_header(compatible):
    p = params.FlexParams(threshold_mult=0, clustered=0, linear_start=0.1, linear_end=0.5, max_guidance=0.35)
    scores = torch.full((T,), 0.5)
    w = matching.slot_weights(scores, p)
    assert float(w[0]) == 0.0  # header cap 0
    assert float(w[47]) == pytest.approx(0.1 + 0.4 * 47 / 76, abs=1e-6)
    assert float(w[47]) == pytest.approx(0.3474, abs=1e-4)
    assert float(w[48]) > 0.35
    txt = _rand(T, 16, seed=5)
    img = _rand(T, 16, seed=6)
    idx = torch.arange(T)
    out = fd.tween(txt, img, idx, scores, w, p.max_guidance, compatible=compatible)
    assert torch.equal(out[0], txt[0])
    for t in range(1, T):
        iw = min(float(w[t]), 0.35)
        torch.testing.assert_close(out[t], txt[t] + (img[t] - txt[t]) * iw)
        if t >= 48:
            assert iw == 0.35


def test_vector5_blend():
    r = matching.blend_weights(torch.tensor([0.1, 0.2]), torch.tensor([-0.5, -0.1]))
    torch.testing.assert_close(r, torch.tensor([-0.4, 0.1]))
    r = matching.blend_weights(torch.tensor([-0.1, -0.2]), torch.tensor([-0.3, 0.5]))
    torch.testing.assert_close(r, torch.tensor([-0.3, -0.2]))
    r = matching.blend_weights(torch.tensor([0.1, 0.0]), torch.tensor([0.0, 0.3]))
    torch.testing.assert_close(r, torch.tensor([0.1, 0.3]))


# --------------------------------------------------------------------------------------------------
# Compatible mode equals the step-by-step rendering


@pytest.mark.parametrize(
    ("priority", "reuse"),
    [("best_fit", True), ("best_fit", False), ("text_order", True), ("text_order", False), ("direct", True)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_compatible_matches_reference_loop(priority, reuse, seed):
    img = _rand(40, 24, seed=10 + seed)
    txt = _rand(T, 24, seed=20 + seed)
    p = params.FlexParams(priority=priority, reuse=reuse, compatible=True, header_max=0.15)
    expected, table, w_ref = ref_guide(txt, img, p)

    idx, score = matching.map_embeddings(img, txt, reuse, priority, compatible=True)
    assert idx.tolist() == [i for i, _ in table]
    torch.testing.assert_close(score, torch.tensor([s for _, s in table], dtype=torch.float32), atol=1e-6, rtol=1e-5)
    w = matching.slot_weights(score, p)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)
    out = fd.tween(txt, img, idx, score, w, p.max_guidance, compatible=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    got = fd.guide_chunks(txt.unsqueeze(0), [(img, 1.0)], p)
    torch.testing.assert_close(got[0], expected, atol=1e-6, rtol=1e-5)

    # the data exercises every branch of the tween rule (direct pairs are rarely strong enough to replace)
    iw = torch.clamp(w.double(), max=p.max_guidance)
    replaced = (iw != 0) & (iw.abs() >= 1 - score.double())
    assert priority == "direct" or replaced.any()
    assert (~replaced & (iw != 0)).any()


def test_compatible_defaults_matches_reference_with_peaks():
    img = _rand(64, 32, seed=7)
    txt = _rand(T, 32, seed=8)
    p = params.FlexParams(compatible=True)
    expected, table, _ = ref_guide(txt, img, p)
    assert matching.cluster_peaks(torch.tensor([s for _, s in table]))  # clustered guidance is active
    got = fd.guide_chunks(txt, [(img, 1.0)], p)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_compatible_last_position_pulled_toward_image_token_0():
    img = _rand(30, 16, seed=9)
    txt = _rand(T, 16, seed=10)
    p = params.FlexParams(compatible=True)
    out = fd.guide_chunks(txt, [(img, 1.0)], p)
    w_last = min(float(matching.slot_weights(matching.map_embeddings(img, txt, compatible=True)[1], p)[76]), 0.35)
    torch.testing.assert_close(out[76], txt[76] + (img[0] - txt[76]) * w_last)


@pytest.mark.parametrize(
    ("priority", "reuse"), [("best_fit", True), ("best_fit", False), ("text_order", True), ("text_order", False)]
)
def test_underflowed_zero_scores_follow_the_original_in_compatible_mode(priority, reuse):
    # text token 50 points away from every image token: its scores underflow to exactly 0
    txt = torch.eye(T, 96)
    img = torch.stack([txt[11], txt[12], txt[30]])
    txt[50] = -(txt[11] + txt[12] + txt[30])
    idx, score = matching.map_embeddings(img, txt, reuse, priority, compatible=True)
    table = ref_map(img, txt, reuse, priority)
    assert idx.tolist() == [i for i, _ in table]
    assert score.tolist() == pytest.approx([s for _, s in table], abs=1e-7)
    assert float(score[49]) == 0.0
    if reuse:
        assert int(idx[49]) == 2  # the original keeps overwriting a zero score: the last image token wins
    idx_n, score_n = matching.map_embeddings(img, txt, reuse, priority)
    assert float(score_n[50]) == 0.0
    out = fd.tween(txt, img, idx_n, score_n, torch.full((T,), 0.3), 0.35)
    assert torch.equal(out[50], txt[50])  # corrected mode: no match, unchanged


def test_corrected_is_the_unshifted_compatible_mapping():
    img = _rand(40, 24, seed=11)
    txt = _rand(T, 24, seed=12)
    for priority in ("best_fit", "text_order"):
        for reuse in (True, False):
            i_c, s_c = matching.map_embeddings(img, txt, reuse, priority, compatible=True)
            i_n, s_n = matching.map_embeddings(img, txt, reuse, priority, compatible=False)
            assert torch.equal(i_n[1:], i_c[:-1])
            assert torch.equal(s_n[1:], s_c[:-1])
            assert (int(i_n[0]), float(s_n[0])) == (0, 0.0)


def test_corrected_direct_pairs_token_i_with_slot_i():
    img = _rand(50, 24, seed=13)
    txt = _rand(T, 24, seed=14)
    idx, score = matching.map_embeddings(img, txt, priority="direct")
    sims = params.similarity_scores(img, txt)
    assert idx.tolist() == list(range(50)) + [0] * 27
    torch.testing.assert_close(score[:50], sims[torch.arange(50), torch.arange(50)])
    assert torch.all(score[50:] == 0)


def test_corrected_unmatched_slot_unchanged_header_pairs_with_cls():
    txt = _rand(5, 8, seed=15)
    img = _rand(3, 8, seed=16)
    idx = torch.tensor([0, 1, 2, 0, 0])
    scores = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0])
    weights = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    out = fd.tween(txt, img, idx, scores, weights, 0.35)
    torch.testing.assert_close(out[0], txt[0] + 0.2 * (img[0] - txt[0]))  # header ↔ CLS by the capped weight
    assert torch.equal(out[3], txt[3]) and torch.equal(out[4], txt[4])
    out_c = fd.tween(txt, img, idx, scores, weights, 0.35, compatible=True)
    torch.testing.assert_close(out_c[4], txt[4] + 0.2 * (img[0] - txt[4]))


def test_no_reuse_uses_each_image_token_once_and_ties_are_deterministic():
    base = torch.eye(5, 16)  # one-hot tokens keep every dot product exact, so duplicates tie bitwise
    img = torch.cat([base, base])  # every image token twice: ties
    txt = _rand(T, 16, seed=18)
    idx, score = matching.map_embeddings(img, txt, reuse=True)
    assert torch.all(idx[1:] < 5)  # ties go to the smaller index
    for priority in ("best_fit", "text_order"):
        idx, score = matching.map_embeddings(img, txt, reuse=False, priority=priority)
        filled = idx[score > 0].tolist()
        assert len(filled) == len(set(filled)) == 10
        again = matching.map_embeddings(img, txt, reuse=False, priority=priority)
        assert torch.equal(again[0], idx) and torch.equal(again[1], score)


# --------------------------------------------------------------------------------------------------
# Crash cases of the original (§7)


def test_equal_adjacent_peaks_no_zero_division():
    s = torch.full((T,), 0.01)
    s[10] = s[11] = 1.0
    assert matching.cluster_peaks(s) == [(10, 11)]
    tent = matching.cluster_tent(s)
    assert torch.isfinite(tent).all()
    assert float(tent[10]) == float(tent[11]) == 1.0
    assert float(tent[5]) == pytest.approx(0.5)
    assert float(tent[11 + 13]) == pytest.approx(1 - 13 / 65, abs=1e-6)
    assert float(tent[0]) == float(tent[76]) == 0.0


def test_plateau_of_three_and_two_separate_plateaus():
    s = torch.full((T,), 0.01)
    s[10:13] = 1.0
    s[20:22] = 1.0
    assert matching.cluster_peaks(s) == [(10, 12), (20, 21)]
    tent = matching.cluster_tent(s)
    # valley between 12 and 20 at 12 + ceil(8 / 2) = 16
    assert float(tent[16]) == 0.0
    assert float(tent[14]) == pytest.approx(0.5)
    assert float(tent[18]) == pytest.approx(0.5)
    assert torch.all(tent[20:22] == 1.0)


@pytest.mark.parametrize("compatible", [False, True])
def test_saturated_adjacent_tokens_end_to_end(compatible):
    # text tokens are orthonormal; two image tokens equal text tokens 11 and 12 → scores exactly 1.0
    txt = torch.eye(T, 96)[:, :96]
    img = torch.stack([txt[11], txt[12], txt[40] + txt[41]])
    _, score = matching.map_embeddings(img, txt, compatible=compatible)
    lo = 10 if compatible else 11
    assert float(score[lo]) == float(score[lo + 1]) == 1.0
    p = params.FlexParams(clustered=0.5, compatible=compatible)
    out = fd.guide_chunks(txt.unsqueeze(0), [(img, 1.0)], p)
    assert torch.isfinite(out).all()
    if compatible:  # the original's shift: position 10 takes text token 11's match, position 11 token 12's
        assert torch.equal(out[0, 10], txt[11]) and torch.equal(out[0, 11], txt[12])
    else:  # score 1 → replaced by its own (identical) image token
        assert torch.equal(out[0, 11], txt[11]) and torch.equal(out[0, 12], txt[12])


def test_batch_of_two_prompts():
    x = _rand(2, T, 24, seed=19)
    img = _rand(40, 24, seed=20)
    p = params.FlexParams()
    out = fd.guide_chunks(x, [(img, 1.0)], p)
    assert out.shape == x.shape
    for b in range(2):
        assert torch.equal(out[b], fd.guide_chunks(x[b : b + 1], [(img, 1.0)], p)[0])
    assert not torch.equal(out, x)


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
