"""The panels' workflow in a real browser: a hover hint on every control (counted against the specs), the 📥 buttons
that take the gallery's selected result into every image input (txt2img and img2img) with a generation using them,
RefDrop's 📌 "record this result", a painted mask (Redux token count, Style model generation), the Redux accordion's
opening time. Screenshots go to the folder the `shots` fixture prints."""

from __future__ import annotations

import numpy as np
import pytest

from lib_imgcond.spec import hints
from tests.e2e import forge
from tests.ui.test_panels import BASE, PANELS, SPECS, eid

STYLE_ADAPTER = "imgcond-ui-style.safetensors"


@pytest.mark.parametrize(("prefix", "tab"), PANELS)
def test_every_control_has_its_hint(browser, shots, prefix, tab):
    """Each parameter and listed control of the spec shows its generated hint: as its title (hidden ones too: the
    inputs of other RefDrop modes, Redux slots not shown yet) and, for the controls on screen, at the pointer."""
    spec = SPECS[prefix]
    expected = {spec.elem_id(name, tab): hint for name, hint in spec.hints().items()}
    assert set(hints.hint_map()) >= {key.rsplit("_", 1)[0] for key in expected}
    browser.tab(tab)
    acc = eid(prefix, "enabled", tab)
    browser.set_open(acc, True)
    try:
        for k in (2, 3, 4):  # slots shown on demand
            add = eid(prefix, f"add_image{k}", tab)
            if browser.js("const e = document.getElementById(arguments[0]); return !!e && e.offsetParent", add):
                browser.click(add)
        subs = ["advanced", "library_more", *(f"advanced{k}" for k in range(1, 5))]  # sub-accordions
        for adv in (eid(prefix, name, tab) for name in subs):
            if browser.js("const e = document.getElementById(arguments[0]); return !!e && e.offsetParent", adv):
                browser.set_open(adv, True)
        browser.wait(lambda: browser.titles([acc])[acc], 30, "the hints to be applied")
        shown = browser.titles(list(expected))
        missing = sorted(k for k, v in shown.items() if v is None)
        wrong = {k: v for k, v in shown.items() if v is not None and v != expected[k]}
        checked = {}
        for k in range(1, 5):  # a panel's slot tabs (Style model, unCLIP) one after the other
            slot_tab = f"//*[@id='{acc}']//button[@role='tab' and normalize-space()='Image {k}']"
            for button in browser.driver.find_elements("xpath", slot_tab):
                browser.js("arguments[0].scrollIntoView({block: 'center'})", button)
                button.click()
            hovered = {key: browser.hover_title(key) for key in expected if key not in checked}
            checked.update({key: v for key, v in hovered.items() if v is not None})
        bad_hover = {k: v for k, v in checked.items() if v != expected[k]}
        print(
            f"\nhints {prefix} {tab}: {len(expected) - len(missing) - len(wrong)}/{len(expected)} controls "
            f"({len(spec.params)} parameters + {len(spec.controls)} other controls), {len(checked)} on screen "
            f"checked at the pointer"
        )
        assert not missing, f"controls not in the page: {missing}"
        assert not wrong, f"wrong titles: {wrong}"
        assert not bad_hover, f"the pointer shows another hint: {bad_hover}"
        assert len(checked) >= len(expected) // 2, "too few controls on screen to check at the pointer"
    finally:
        browser.set_open(acc, False)


def image_inputs(prefix: str) -> list[str]:
    """The image parameters of a panel that have a gallery button."""
    spec = SPECS[prefix]
    return [p.name for p in spec.params if p.kind == "image" and f"gallery_{p.name}" in spec.controls]


def show_input(browser, prefix: str, name: str, tab: str) -> None:
    """Open the panel and bring the input on screen: a slot shown on demand, a slot's tab, RefDrop's mode Image."""
    browser.set_open(eid(prefix, "enabled", tab), True)
    k = name[-1] if name[-1].isdigit() else ""
    add = eid(prefix, f"add_image{k}", tab)
    if k and browser.js("const e = document.getElementById(arguments[0]); return !!e && e.offsetParent", add):
        browser.click(add)
    tab_button = f"//*[@id='{eid(prefix, 'enabled', tab)}']//button[@role='tab' and normalize-space()='Image {k}']"
    for button in browser.driver.find_elements("xpath", tab_button) if k else ():
        browser.js("arguments[0].scrollIntoView({block: 'center'})", button)
        button.click()
    if prefix == "refdrop" and browser.value(eid(prefix, "mode", tab)) != "Image":
        browser.choose(eid(prefix, "mode", tab), "Image")
    browser.wait(lambda: browser.element(eid(prefix, name, tab)).is_displayed(), 30, f"{prefix} {name} on screen")


def fill_from_gallery(browser, tab: str, chosen: str, other: str | None) -> list[str]:
    """Press every image input's 📥 button in `tab`; each input must then show the chosen result (closer to it
    than to `other`, another result)."""
    filled = []
    for prefix in SPECS:
        for name in image_inputs(prefix) if (prefix, tab) in PANELS else ():
            show_input(browser, prefix, name, tab)
            target = eid(prefix, name, tab)
            old = browser.image_src(target)
            browser.click(eid(prefix, f"gallery_{name}", tab))
            src = browser.wait_image(target, old)
            near = browser.distance(src, chosen)
            assert 0 <= near < 8, f"{prefix} {name}: the input differs from the selected result ({near:.1f})"
            far = browser.distance(src, other) if other else None
            if far is not None:
                assert far > near + 5, f"{prefix} {name}: as far from the selected result ({near}) as from another"
            filled.append(f"{prefix}.{name} ({near:.1f}" + (f" vs {far:.1f})" if far is not None else ")"))
        browser.set_open(eid(prefix, "enabled", tab), False)
    return filled


@pytest.fixture(scope="module")
def style_files(ui_server):
    """A random style adapter beside the conftest's CLIP ViT-L/14 encoder (as tests/e2e/test_style_model.py)."""
    from safetensors.torch import save_file

    from tests.e2e.test_style_model import adapter_state

    folder = ui_server.data_dir / "models" / "imgcond" / "style"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(), str(folder / STYLE_ADAPTER))


def combined(tab: str, reference: str = "") -> str:
    """An infotext switching on CLIP image guidance and Style model (and RefDrop, named, mode left as it is): their
    images come from the gallery; Redux and unCLIP are switched off (they need Flux / an unCLIP checkpoint)."""
    from tests.e2e.test_flexdiffuse import ENCODER_L

    keys = [
        "flexdiffuse_enabled: True", "flexdiffuse_weight: 1.0", "flexdiffuse_weight2: 0.5",
        "style_model_enabled: True", f"style_model_encoder: {ENCODER_L}", f"style_model_adapter: {STYLE_ADAPTER}",
    ]  # fmt: skip
    if reference:
        keys += ["refdrop_enabled: True", f"refdrop_reference: {reference}"]
    return f"{BASE}, " + ", ".join(keys)


def test_gallery_buttons_fill_every_image_input_and_a_generation_uses_them(browser, shots, style_files):
    """txt2img: a batch of two; the second image selected; every 📥 puts it into its input (a slot's mask painted
    on the Style image); then one generation with CLIP image guidance, Style model and RefDrop (its 📌: mode Image
    from the selected result, named) writes their keys, and the named reference is listed and usable (Use).
    img2img: the host's "send to img2img", one generation, every 📥 from img2img's gallery, one generation."""
    tab = "txt2img"
    browser.tab(tab)
    browser.paste(tab, BASE)
    browser.set_number(f"{tab}_batch_size", 2)
    try:
        browser.generate(tab)
    finally:
        browser.set_number(f"{tab}_batch_size", 1)
    results = browser.results(tab)
    assert len(results) >= 2, results
    browser.select_result(tab, len(results) - 1)
    filled = fill_from_gallery(browser, tab, results[-1], results[-2])
    redux_count = browser.text(eid("redux", "count", tab))
    print("\ntxt2img, filled from the gallery (distance to the selected result vs another, 0–255):")
    print("  " + ", ".join(filled) + f"\nRedux count: {redux_count}")
    assert all(f"image {k}:" in redux_count for k in range(1, 5)), redux_count

    browser.paste(tab, combined(tab, reference="fromresult"))
    browser.set_open(eid("refdrop", "enabled", tab), True)
    browser.choose(eid("refdrop", "mode", tab), "Record")
    old = browser.image_src(eid("refdrop", "image", tab))
    browser.click(eid("refdrop", "record", tab))  # 📌 record this result
    browser.wait(lambda: browser.value(eid("refdrop", "mode", tab)) == "Image", 30, "mode Image")
    assert browser.distance(browser.wait_image(eid("refdrop", "image", tab), old), results[-1]) < 8
    show_input(browser, "style_model", "image1", tab)
    browser.paint(eid("style_model", "paint1", tab), [(0.1, 0.1, 0.6, 0.6)], shot=shots / "paint_style.png")
    browser.wait_image(eid("style_model", "mask1", tab))
    browser.element(eid("refdrop", "enabled", tab)).screenshot(str(shots / "refdrop_record_result.png"))
    text = browser.generate(tab)
    browser.driver.save_screenshot(str(shots / "generated_from_gallery_txt2img.png"))
    assert "Error" not in text, text
    for key in ("flexdiffuse_enabled: True", "style_model_enabled: True", "refdrop_mode: Image"):
        assert key in text, (key, text)
    assert "refdrop_reference: fromresult" in text, text
    browser.click(eid("refdrop", "refresh", tab))
    browser.wait(lambda: "fromresult" in browser.text(eid("refdrop", "library", tab)), 30, "the library to list it")
    browser.paste(tab, f"{BASE}, refdrop_enabled: True, refdrop_mode: Use, refdrop_reference: fromresult")
    used = browser.generate(tab)
    assert "Error" not in used and "refdrop_mode: Use" in used and "refdrop_reference: fromresult" in used, used
    print(f"RefDrop: 'fromresult' recorded from the gallery image (mode Image) and used:\n{used}")

    browser.click(f"{tab}_send_to_img2img")  # the host's own button: the result becomes img2img's input
    tab = "img2img"
    browser.wait(lambda: browser.element(f"tab_{tab}").is_displayed(), 30, "the img2img tab")
    browser.paste(tab, BASE)
    browser.generate(tab)
    results = browser.results(tab)
    assert results, "no result in img2img's gallery"
    filled = fill_from_gallery(browser, tab, results[0], None)
    print("img2img, filled from the gallery (distance to its result):\n  " + ", ".join(filled))
    assert len(filled) == sum(len(image_inputs(p)) for p in SPECS)
    browser.paste(tab, combined(tab))
    text = browser.generate(tab)
    browser.driver.save_screenshot(str(shots / "generated_from_gallery_img2img.png"))
    assert "Error" not in text and "flexdiffuse_enabled: True" in text and "style_model_enabled: True" in text, text
    browser.paste(tab, BASE)
    browser.tab("txt2img")
    browser.paste("txt2img", BASE)


def mask_b64(width: int, height: int, box: tuple[int, int, int, int]) -> str:
    mask = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    return forge.encode(mask)


def count_of(text: str) -> int:
    """The token count of slot 1 in the Redux panel's count line ('… (image 1: 17).')."""
    return int(text.split("image 1: ")[1].split(")")[0].split(",")[0].split(" ")[0])


def test_painted_mask_changes_the_redux_token_count(browser, shots):
    """Token control 'advanced' (factor 3: 81 tokens): a stroke painted over image 1 keeps only the tokens under
    it, like an uploaded mask; uploading a mask still works and replaces the painted one."""
    from tests.e2e.test_redux import reference_b64

    tab = "txt2img"
    browser.tab(tab)
    browser.paste(tab, f"{BASE}, redux_enabled: True, redux_control1: advanced, redux_factor1: 3")
    try:
        browser.set_open(eid("redux", "enabled", tab), True)
        browser.upload(eid("redux", "image1", tab), reference_b64())
        count = eid("redux", "count", tab)
        browser.wait(lambda: "image 1: 81" in browser.text(count), 60, "81 tokens")
        browser.paint(eid("redux", "paint1", tab), [(0.05, 0.1, 0.45, 0.5)], shot=shots / "paint_redux.png")
        browser.wait_image(eid("redux", "mask1", tab))
        browser.wait(lambda: count_of(browser.text(count)) != 81, 60, "the count to change")
        painted = count_of(browser.text(count))
        browser.element(eid("redux", "enabled", tab)).screenshot(str(shots / "redux_painted_mask.png"))
        old = browser.image_src(eid("redux", "mask1", tab))
        browser.js("document.querySelector('#' + arguments[0] + ' button[aria-label=\"Clear\"]')?.click()", eid(
            "redux", "mask1", tab))  # fmt: skip
        browser.upload(eid("redux", "mask1", tab), mask_b64(64, 48, (32, 0, 64, 48)))
        browser.wait_image(eid("redux", "mask1", tab), old)
        browser.wait(lambda: count_of(browser.text(count)) not in (81, painted), 60, "the uploaded mask's count")
        uploaded = count_of(browser.text(count))
        print(f"\nRedux image 1 tokens: 81 without a mask, {painted} with the painted mask, {uploaded} uploaded")
        assert 0 < painted < 81 and 0 < uploaded < 81
    finally:
        browser.paste(tab, BASE)


def test_redux_accordion_opens_fast_with_every_slot(browser):
    tab = "txt2img"
    browser.tab(tab)
    acc = eid("redux", "enabled", tab)
    browser.set_open(acc, True)
    for k in (2, 3, 4):
        show_input(browser, "redux", f"image{k}", tab)
    times = []
    try:
        for _ in range(3):
            browser.set_open(acc, False)
            times.append(browser.open_time_ms(acc, eid("redux", "count", tab)))
    finally:
        browser.paste(tab, BASE)
    print(f"\nRedux accordion (4 slots shown) opened in {', '.join(f'{t / 1000:.2f}' for t in times)} s")
    assert all(0 <= t < 2000 for t in times), times
