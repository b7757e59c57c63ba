"""Unit tests for hires mixing's parameters, schedules and plot (seeds-algorithms.md §3.8 vectors; §7 crash list)."""

from __future__ import annotations

import dataclasses
import math
import xml.etree.ElementTree as ET

import pytest

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.mixing.schedules import (
    SCHEDULES,
    MixParams,
    demofusion_c1,
    demofusion_c3,
    demofusion_cf,
    im_denoised_weights,
    schedule_svg,
    zprime_weights,
)

# ---------------------------------------------------------------------------------------------------------------
# §3.8 vectors 1–3: original Iterative Mixing schedules (denoised-weight convention)
# ---------------------------------------------------------------------------------------------------------------


def test_im_cosine_vector_1():
    c = im_denoised_weights(20, alpha=2.4, schedule="cosine")
    expected = {0: 0.0, 1: 5e-6, 5: 0.009946, 10: 0.189465, 15: 0.683839, 19: 0.985290}
    for i, v in expected.items():
        assert c[i] == pytest.approx(v, abs=1e-6), i
    assert im_denoised_weights(20, alpha=3.0)[10] == pytest.approx(0.125, abs=1e-12)
    assert im_denoised_weights(20, alpha=1.0)[10] == pytest.approx(0.5, abs=1e-12)
    assert im_denoised_weights(20, alpha=3.0, schedule="im_cosine") == im_denoised_weights(20, alpha=3.0)


def test_im_linear_and_logistic_vector_2():
    lin = im_denoised_weights(20, schedule="linear")
    assert lin == pytest.approx([i / 20 for i in range(20)])
    assert lin[-1] == pytest.approx(0.95)
    lo = im_denoised_weights(20, alpha=2.4, schedule="logistic")
    for i, v in {0: 0.001804, 5: 0.040781, 10: 0.5, 19: 0.996612}.items():
        assert lo[i] == pytest.approx(v, abs=1e-6), i


def test_im_squeeze_and_clamp_vector_3():
    c = im_denoised_weights(20, alpha=3.0, blend_min=0.2, blend_max=0.9)
    assert c[10] == pytest.approx(0.2875, abs=1e-12)
    clamped = im_denoised_weights(20, alpha=2.4, clamp=0.5)
    assert clamped[10:] == [1.0] * 10
    assert clamped[:10] == im_denoised_weights(20, alpha=2.4)[:10]
    squeezed = im_denoised_weights(20, alpha=2.4, clamp=0.5, blend_min=0.2, blend_max=0.9)
    assert squeezed[10:] == pytest.approx([0.9] * 10)


def test_im_cosine_ignores_start_linear_does_not():
    assert im_denoised_weights(20, start=0.5) == im_denoised_weights(20)
    lin = im_denoised_weights(20, start=0.25, schedule="linear")
    assert lin[:5] == [0.0] * 5
    assert lin[5] == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------------------------
# §3.8 vector 6: DemoFusion
# ---------------------------------------------------------------------------------------------------------------


def test_demofusion_vector_6():
    assert demofusion_cf(981) == pytest.approx(0.99911, abs=1e-5)
    assert demofusion_c1(981, alpha=3) == pytest.approx(0.99733, abs=1e-5)
    assert demofusion_cf(501) == pytest.approx(0.50157, abs=1e-5)
    assert demofusion_c1(501, alpha=3) == pytest.approx(0.12618, abs=1e-5)
    assert demofusion_c1(1, alpha=3) == pytest.approx(0.0, abs=1e-12)
    assert demofusion_c3(1) == pytest.approx(0.0100, abs=1e-5)
    assert demofusion_c1(1000) == 1.0


def test_demofusion_schedule_matches_t_based_formula():
    """Our step-progress c₁ equals DemoFusion's t-based c₁ at t = T·(1 − i/n) (50 steps, α = 3)."""
    n = 50
    w = zprime_weights(MixParams(), n)
    for i in range(n):
        assert w[i] == pytest.approx(demofusion_c1(1000 - 1000 * i / n, alpha=3.0), abs=1e-12), i
    assert w[0] == 1.0
    assert w[25] == pytest.approx(0.125, abs=1e-12)
    # The SDXL Euler timesteps 981, 961, … sit 0.019 of progress later than i/n: same curve, shifted.
    timesteps = list(range(981, 0, -20))
    assert len(timesteps) == n
    assert demofusion_c1(timesteps[12]) == pytest.approx(
        zprime_weights(MixParams(stop=1.0), 1000)[1000 - timesteps[12]], abs=1e-12
    )


def test_demofusion_vs_iterative_mixing_cosine():
    """Same "0.125" at p = ½, α = 3, but attached to opposite terms (§3.6)."""
    df = zprime_weights(MixParams(schedule="demofusion_cosine", alpha=3.0), 20)
    im = zprime_weights(MixParams(schedule="im_cosine", alpha=3.0), 20)
    assert df[10] == pytest.approx(0.125)
    assert im[10] == pytest.approx(0.875)
    assert im == pytest.approx([1 - c for c in im_denoised_weights(20, alpha=3.0)], abs=1e-12)
    one_df = zprime_weights(MixParams(schedule="demofusion_cosine", alpha=1.0), 20)
    one_im = zprime_weights(MixParams(schedule="im_cosine", alpha=1.0), 20)
    assert one_df == pytest.approx(one_im, abs=1e-12)


def test_linear_and_logistic_zprime_weights():
    assert zprime_weights(MixParams(schedule="linear"), 20) == pytest.approx([1 - i / 20 for i in range(20)])
    lo = zprime_weights(MixParams(schedule="logistic", alpha=2.4), 20)
    ref = im_denoised_weights(20, alpha=2.4, schedule="logistic")
    assert lo == pytest.approx([1 - c for c in ref], abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# window, clamp, squeeze
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_window_semantics(schedule):
    n = 20
    p = MixParams(schedule=schedule, alpha=2.0, start=0.25, stop=0.75, blend_min=0.1, blend_max=0.8)
    w = zprime_weights(p, n)
    assert len(w) == n
    assert w[:5] == [0.0] * 5  # before start: exactly 0, not blend_min
    assert w[15:] == [0.0] * 5  # from stop on: exactly 0
    raw = zprime_weights(dataclasses.replace(p, blend_min=0.0, blend_max=1.0), n)
    for i in range(5, 15):
        assert 0.1 <= w[i] <= 0.8
        assert w[i] == pytest.approx(0.1 + raw[i] * 0.7, abs=1e-12)


def test_clamp_cuts_the_window():
    full = zprime_weights(MixParams(schedule="linear"), 20)
    w = zprime_weights(MixParams(schedule="linear", clamp=0.5, blend_min=0.3), 20)
    assert w[10:] == [0.0] * 10
    assert w[:10] == pytest.approx([0.3 + 0.7 * v for v in full[:10]])


def test_stop_above_one_stretches_the_curve():
    w = zprime_weights(MixParams(stop=2.0), 10)
    assert all(v > 0 for v in w)
    assert w == pytest.approx([demofusion_c1(1000 - 1000 * i / 20) for i in range(10)], abs=1e-12)


def test_start_after_stop_means_no_mixing():
    assert zprime_weights(MixParams(start=0.8, stop=0.5), 10) == [0.0] * 10


def test_fraction_rounding_is_robust():
    # 0.29 * 100 = 28.999999999999996 in binary; the window must still start at step 29.
    w = zprime_weights(MixParams(schedule="linear", start=0.29), 100)
    assert w[28] == 0.0
    assert w[29] > 0.0


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_blend_max_zero_gives_exact_zero_weights(schedule):
    w = zprime_weights(MixParams(schedule=schedule, blend_min=0.0, blend_max=0.0), 30)
    assert w == [0.0] * 30
    assert all(type(v) is float for v in w)


def test_zero_and_one_step():
    assert zprime_weights(MixParams(), 0) == []
    assert zprime_weights(MixParams(), 1) == [1.0]


# ---------------------------------------------------------------------------------------------------------------
# §7: stop rounding to 0, logistic NameError, NaN-free
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [s for s in SCHEDULES if s != "linear"])
def test_stop_rounding_to_zero_is_well_defined(schedule):
    w = zprime_weights(MixParams(schedule=schedule, stop=0.04), 20)
    assert all(math.isfinite(v) for v in w)
    assert w[0] > 0.0
    assert w[1:] == [0.0] * 19  # S = 1: only step 0 lies in the window
    assert zprime_weights(MixParams(schedule=schedule, stop=0.0), 20) == [0.0] * 20


def test_linear_stop_rounding_to_zero_is_the_originals_plain_ramp():
    # Iterative Mixing's linear: stop = int(0.04·20) = 0 → `or steps` → c_i = i/20 (it used to be [0, 1, 1, …])
    c = im_denoised_weights(20, stop=0.04, schedule="linear")
    assert c == pytest.approx([i / 20 for i in range(20)], abs=1e-12)
    assert im_denoised_weights(20, stop=0.0, schedule="linear") == c  # int(0·20) = 0 takes the same path
    assert im_denoised_weights(20, stop=0.04, start=0.25, schedule="linear") == [0.0] * 5 + c[5:]
    # our z' weights are 1 − c on the whole pass
    w = zprime_weights(MixParams(schedule="linear", stop=0.04), 20)
    assert w == pytest.approx([1.0 - i / 20 for i in range(20)], abs=1e-12)
    # stop = 0 stays our explicit "no mixing"
    assert zprime_weights(MixParams(schedule="linear", stop=0.0), 20) == [0.0] * 20


def test_cosine_stop_rounding_to_zero_keeps_the_nan_fix():
    # the original gives c_0 = NaN (0/0) and 1 after; ours is the limit 0 at i = 0 and 1 from then on
    assert im_denoised_weights(20, alpha=2.4, stop=0.04, schedule="cosine") == [0.0] + [1.0] * 19


@pytest.mark.parametrize("schedule", ["cosine", "linear", "logistic"])
def test_original_schedule_stop_rounding_to_zero_no_nan(schedule):
    c = im_denoised_weights(20, alpha=2.4, stop=0.04, schedule=schedule)
    assert len(c) == 20
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in c)
    assert all(math.isfinite(v) for v in im_denoised_weights(1, schedule=schedule))


def test_logistic_with_huge_alpha_does_not_overflow():
    w = zprime_weights(MixParams(schedule="logistic", alpha=100.0), 200)
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in w)
    assert all(math.isfinite(v) for v in im_denoised_weights(200, alpha=100.0, schedule="logistic"))


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("schedule", "cosine"),
        ("blend", "lerp"),
        ("alpha", 0.0),
        ("alpha", 101.0),
        ("alpha", float("nan")),
        ("alpha", "3"),
        ("start", -0.1),
        ("start", 1.5),
        ("stop", 2.5),
        ("stop", -1.0),
        ("clamp", 1.01),
        ("blend_min", -0.2),
        ("blend_max", 1.2),
        ("blend_max", True),
        ("normalize", 1),
        ("fresh_noise", "yes"),
    ],
)
def test_validate_names_the_argument(field, value):
    p = dataclasses.replace(MixParams(), **{field: value})
    with pytest.raises(ArgumentError) as info:
        p.validate()
    assert info.value.name == field
    assert field in str(info.value)
    assert repr(value) in str(info.value)


def test_validate_blend_min_above_max():
    with pytest.raises(ArgumentError, match="blend_min") as info:
        MixParams(blend_min=0.6, blend_max=0.4).validate()
    assert "blend_max" in str(info.value)


def test_validate_accepts_defaults_and_edges():
    assert MixParams().validate() == MixParams()
    MixParams(alpha=100, start=1.0, stop=2.0, clamp=0.0, blend_min=1.0, blend_max=1.0).validate()
    assert isinstance(ArgumentError("x", 1, "y"), ImgcondError)


def test_zprime_weights_rejects_bad_steps():
    with pytest.raises(ArgumentError, match="n_steps"):
        zprime_weights(MixParams(), -1)
    with pytest.raises(ArgumentError, match="n_steps"):
        zprime_weights(MixParams(), 2.5)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="schedule"):
        im_denoised_weights(20, schedule="demofusion_cosine")


# ---------------------------------------------------------------------------------------------------------------
# SVG
# ---------------------------------------------------------------------------------------------------------------


def test_schedule_svg_well_formed_and_deterministic():
    w = zprime_weights(MixParams(), 20)
    svg = schedule_svg(w, title='DemoFusion <α=3> & "q"')
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    assert root.get("width") == "320"
    assert svg == schedule_svg(w, title='DemoFusion <α=3> & "q"')
    ns = "{http://www.w3.org/2000/svg}"
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert "0" in texts
    assert "1" in texts
    assert 'DemoFusion <α=3> & "q"' in texts
    poly = root.find(f"{ns}polyline")
    assert poly is not None
    assert len(poly.get("points").split()) == 20
    assert "<script" not in svg


@pytest.mark.parametrize("weights", [[], [0.5], [0.0, 1.0], [1.0] * 300])
def test_schedule_svg_edge_cases(weights):
    ET.fromstring(schedule_svg(weights, width=200, height=90))


def test_schedule_svg_rejects_bad_input():
    with pytest.raises(ArgumentError, match="weights"):
        schedule_svg([0.1, float("nan")])
    with pytest.raises(ArgumentError, match="width"):
        schedule_svg([0.1], width=10)
