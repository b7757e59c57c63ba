"""The step window (common.window): bounds from percent_to_sigma, tested per sigma."""

import pytest

from lib_imgcond.common import window
from lib_imgcond.common.errors import ArgumentError


def linear(percent):
    """A stand-in for Forge's percent_to_sigma: sigma 10 at 0 %, 0 at 100 % (with Forge's sentinels)."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    return 10.0 * (1.0 - percent)


def test_full_window_is_always_inside_without_asking_the_schedule():
    def never(_p):
        raise AssertionError("percent_to_sigma called for a full window")

    inside = window.sigma_test(0.0, 1.0, never)
    assert all(inside(s) for s in (1e9, 14.6, 1.0, 0.0))


@pytest.mark.parametrize("start", [0.0, 0.3, 1.0])
def test_start_equals_end_is_never_inside(start):
    inside = window.sigma_test(start, start, linear)
    assert not any(inside(s) for s in (1e9, 14.6, 10.0, 7.0, 3.0, 0.0))


def test_bounds_are_inclusive_with_a_relative_tolerance():
    inside = window.sigma_test(0.2, 0.6, linear)  # sigma 8 .. 4
    assert [inside(s) for s in (8.0000001, 8.0, 6.0, 4.0, 3.9999999)] == [True] * 5
    assert [inside(s) for s in (8.001, 3.999, 0.0, 14.6)] == [False] * 4


def test_open_start_and_open_end():
    assert window.sigma_test(0.0, 0.5, linear)(14.6) and not window.sigma_test(0.0, 0.5, linear)(4.9)
    assert window.sigma_test(0.5, 1.0, linear)(0.0) and not window.sigma_test(0.5, 1.0, linear)(5.1)


def test_flow_schedule():
    """Flux sigmas lie in [0, 1]: percent_to_sigma(p) = 1 - p."""
    inside = window.sigma_test(0.25, 0.5, lambda p: 1.0 - p)
    assert [inside(s) for s in (0.8, 0.75, 0.6, 0.5, 0.4)] == [False, True, True, True, False]


def test_without_a_schedule_only_the_full_and_empty_windows_are_known():
    assert window.sigma_test(0.2, 0.6, None)(3.0)
    assert not window.sigma_test(0.4, 0.4, None)(3.0)


def test_check_names_the_argument():
    window.check(0.0, 0.0, "style_model")
    window.check(0.2, 1.0, "style_model")
    with pytest.raises(ArgumentError, match=r"style_model\.end.*\[start \(0\.5\), 1\]"):
        window.check(0.5, 0.4, "style_model")
    with pytest.raises(ArgumentError, match=r"redux\.start"):
        window.check(-0.1, 0.4, "redux")
