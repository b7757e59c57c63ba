"""FlexDiffuse unit tests: the token mapping in both modes against the step-by-step rendering, and the original's
crash cases (§7) (CPU, small tensors).
"""

from __future__ import annotations

import pytest
import torch

from lib_imgcond.flexdiffuse import guidance as fd
from lib_imgcond.flexdiffuse import matching, params
from tests.flex_reference import T, _rand, ref_guide, ref_map

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
