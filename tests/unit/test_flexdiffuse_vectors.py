"""FlexDiffuse unit tests: FlexParams validation and the §4.5 reference vectors (CPU, small tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.flexdiffuse import guidance as fd
from lib_imgcond.flexdiffuse import matching, params
from tests.flex_reference import T, _rand

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
