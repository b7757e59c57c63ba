"""Every accordion in a real browser: it opens and fits 1366 px, a UI generation writes its keys, paste-back through
the prompt box and the host's "read generation parameters" button restores every control, bad input shows our
message in the UI. Screenshots of every panel go to the folder the `shots` fixture prints."""

from __future__ import annotations

import math

import pytest

from lib_imgcond.flexdiffuse import spec as flex_spec
from lib_imgcond.mixing import spec as mixing_spec
from lib_imgcond.redux import spec as redux_spec
from lib_imgcond.refdrop import spec as refdrop_spec
from lib_imgcond.style import spec as style_spec
from lib_imgcond.unclip import spec as unclip_spec
from tests.e2e import forge

SPECS = {
    s.prefix: s
    for s in (refdrop_spec.SPEC, redux_spec.SPEC, flex_spec.SPEC, mixing_spec.SPEC, style_spec.SPEC, unclip_spec.SPEC)
}
PANELS = [
    (prefix, tab) for prefix in SPECS for tab in ("txt2img", "img2img") if not (prefix == "hrmix" and tab == "img2img")
]
BASE = "a photo of a cat\nSteps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 64x64"
HIRES = f"Denoising strength: 0.5, Hires upscale: 2, Hires steps: 2, Hires upscaler: {forge.hires_upscaler()}"


def eid(prefix: str, name: str, tab: str) -> str:
    return f"imgcond_{prefix}_{name}_{tab}"


def other_value(p):
    """A valid value of `p` that differs from its default."""
    if p.kind == "bool":
        return not p.default
    if p.kind == "choice":
        return next(c for c in p.choices if c != p.default)
    if p.kind == "str":
        return f"ui-{p.name.replace('_', '-')}"
    step = p.step or 0.01
    value = p.minimum + round((p.maximum - p.minimum) * 0.37 / step) * step
    value = round(value, 4) if p.kind == "float" else int(value)
    return value if value != p.default else p.maximum


def infotext(spec, values: dict, extra: str = "", full: bool = False) -> str:
    """An infotext with `values` for `spec`; `full`: every other key at its default too (absent keys leave a control
    at whatever an earlier paste set; empty texts are not written, as the extension does)."""
    if full:
        values = {**{p.name: p.default for p in spec.params if p.infotext and p.default != ""}, **values}
    keys = ", ".join(f"{spec.key(n)}: {v}" for n, v in values.items())
    return f"{BASE}{', ' + extra if extra else ''}, {spec.enabled_key}: True, {keys}"


def same(shown, wanted) -> bool:
    if isinstance(wanted, bool):
        return shown is wanted
    if isinstance(wanted, (int, float)):
        try:
            return math.isclose(float(shown), float(wanted), abs_tol=1e-6)
        except (TypeError, ValueError):
            return False
    return shown == wanted


@pytest.mark.parametrize(("prefix", "tab"), PANELS)
def test_panel_opens_and_fits_1366_px(browser, shots, prefix, tab):
    browser.tab(tab)
    acc = eid(prefix, "enabled", tab)
    browser.set_open(acc, True)
    try:
        advanced = [eid(prefix, "advanced", tab)] if any(p.advanced for p in SPECS[prefix].params) else []
        for adv in advanced + ([eid(prefix, "advanced1", tab)] if prefix == "redux" else []):
            browser.set_open(adv, True)
        assert browser.element(acc).is_displayed()
        found = browser.overflow(acc)
        browser.element(acc).screenshot(str(shots / f"{prefix}_{tab}.png"))
        assert not found["page"], f"{prefix} in {tab}: the page scrolls sideways"
        assert not found["out"], f"{prefix} in {tab}: elements stick out of the panel: {found['out']}"
    finally:
        browser.set_open(acc, False)


@pytest.mark.parametrize(("prefix", "tab"), PANELS)
def test_paste_back_restores_every_control(browser, prefix, tab):
    spec = SPECS[prefix]
    browser.tab(tab)
    values = {p.name: other_value(p) for p in spec.params if p.infotext}
    browser.paste(tab, infotext(spec, values))
    try:
        assert browser.enabled(eid(prefix, "enabled", tab)), "the pasted infotext enables the technique"
        wrong = {}
        for name, wanted in values.items():
            shown = browser.value(eid(prefix, name, tab))
            if not same(shown, wanted):
                wrong[name] = (shown, wanted)
        assert not wrong, f"controls not restored (shown, pasted): {wrong}"
    finally:
        browser.paste(tab, BASE)  # no key of ours: the technique is switched off again
    assert not browser.enabled(eid(prefix, "enabled", tab))


GENERATIONS = {
    "refdrop": ({"mode": "Record", "reference": "uiref"}, ""),
    "flexdiffuse": ({"weight": 1.0}, ""),
    "hrmix": ({"schedule": "demofusion_cosine"}, HIRES),
}


@pytest.mark.parametrize("prefix", list(GENERATIONS))
def test_generation_from_the_ui_writes_its_keys(browser, shots, prefix):
    spec = SPECS[prefix]
    values, extra = GENERATIONS[prefix]
    browser.tab("txt2img")
    if prefix == "flexdiffuse":  # the guidance image: upload one into the first slot
        from tests.e2e.test_flexdiffuse import guidance_image

        browser.set_open(eid(prefix, "enabled", "txt2img"), True)
        browser.upload(eid(prefix, "image", "txt2img"), guidance_image(5))
    browser.paste("txt2img", infotext(spec, values, extra, full=True))
    try:
        text = browser.generate("txt2img")
        browser.driver.save_screenshot(str(shots / f"generated_{prefix}.png"))
        assert "Error" not in text, text
        assert f"{spec.enabled_key}: True" in text, text
        for name in values:
            assert f"{spec.key(name)}: " in text, (name, text)
    finally:
        browser.paste("txt2img", BASE)


BAD = {
    "refdrop": ({"mode": "Use", "reference": "no-such-reference"}, "no-such-reference"),
    "redux": ({}, "needs a Flux"),
}


@pytest.mark.parametrize("prefix", list(BAD))
def test_bad_input_shows_our_message(browser, shots, ui_server, prefix):
    spec = SPECS[prefix]
    values, message = BAD[prefix]
    browser.tab("txt2img")
    if prefix == "redux":
        from tests.e2e.test_redux import reference_b64

        browser.set_open(eid(prefix, "enabled", "txt2img"), True)
        browser.upload(eid(prefix, "image1", "txt2img"), reference_b64())
    browser.paste("txt2img", infotext(spec, values, full=True))
    try:
        text = browser.generate("txt2img")
        browser.driver.save_screenshot(str(shots / f"error_{prefix}.png"))
        assert message in text, text
    finally:
        browser.paste("txt2img", BASE)
    tail = ui_server.log_tail(400)
    assert "Exception in ASGI application" not in tail
