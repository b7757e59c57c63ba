"""The image tools' server side (lib_imgcond/webui/images.py) against a small fake of Gradio: the 📥 buttons wait
for their tab's gallery and then hand over the selected result, the 🖌️ handler turns the painted PNG into the mask
upload's value at the image's size."""

from __future__ import annotations

import base64
import importlib
import io
import sys
import types

import pytest
from PIL import Image

UNCHANGED = object()  # what the fake gr.update() returns


class FakeButton:
    def __init__(self, *args, **kwargs):
        self.kwargs, self.clicks = kwargs, []

    def click(self, **kwargs):
        self.clicks.append(kwargs)


@pytest.fixture
def images(monkeypatch):
    gradio = types.ModuleType("gradio")
    gradio.__version__ = "4.40.0"
    gradio.warnings = []
    gradio.update = lambda **kw: kw or UNCHANGED
    gradio.Warning = gradio.warnings.append
    gradio.Button = FakeButton
    monkeypatch.setitem(sys.modules, "gradio", gradio)
    package = importlib.import_module("lib_imgcond.webui")
    for name in ("panel", "images"):  # fresh modules on this fake (another test may have imported them on its own)
        monkeypatch.delitem(sys.modules, f"lib_imgcond.webui.{name}", raising=False)
        monkeypatch.delattr(package, name, raising=False)
    module = importlib.import_module("lib_imgcond.webui.images")
    yield module
    for name in ("panel", "images"):
        sys.modules.pop(f"lib_imgcond.webui.{name}", None)


def png_data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_gallery_buttons_wait_for_their_tab_and_hand_over_the_selected_result(images):
    links = images.GalleryLinks()
    registered = []
    script = types.SimpleNamespace(on_after_component=lambda cb, elem_id: registered.append((elem_id, cb)))
    links.register(script)
    assert [e for e, _ in registered] == ["txt2img_gallery", "img2img_gallery"]

    one, two = FakeButton(), FakeButton()
    links.add("txt2img", one, ["image"])
    links.add("txt2img", two, ["mode", "image"], lambda image: ("Image", image))
    links.add("img2img", FakeButton(), ["other"])
    gallery = object()
    registered[0][1](types.SimpleNamespace(component=gallery))  # the host creates txt2img's gallery
    assert links.pending["txt2img"] == [] and len(links.pending["img2img"]) == 1
    for button, outputs in ((one, ["image"]), (two, ["mode", "image"])):
        (click,) = button.clicks
        assert click["inputs"] == [gallery] and click["outputs"] == outputs
        assert click["js"] == "(gallery) => imgcondGalleryPick('txt2img', gallery)"

    picked = Image.new("RGB", (8, 6), (10, 20, 30))
    value = [(picked, "caption")]  # what Gradio 4 hands over for a one-item gallery of type "pil"
    assert one.clicks[0]["fn"](value) is picked
    assert two.clicks[0]["fn"](value) == ("Image", picked)
    assert one.clicks[0]["fn"](None) is UNCHANGED and two.clicks[0]["fn"]([]) == [UNCHANGED, UNCHANGED]
    assert len(sys.modules["gradio"].warnings) == 2 and "generate an image first" in sys.modules["gradio"].warnings[0]


def test_painted_mask_becomes_a_mask_of_the_image_size(images):
    image = Image.new("RGB", (40, 30))
    painted = Image.new("RGB", (40, 30), (0, 0, 0))
    painted.paste((255, 255, 255), (0, 0, 10, 30))
    mask = images.painted_mask(image, png_data_url(painted))
    assert mask.mode == "L" and mask.size == (40, 30)
    assert mask.getpixel((5, 5)) == 255 and mask.getpixel((30, 5)) == 0
    small = images.painted_mask(image, png_data_url(painted.resize((20, 15))))
    assert small.size == (40, 30) and small.getpixel((2, 2)) == 255
    assert images.painted_mask(image, "") is UNCHANGED  # cancelled: the mask upload keeps its value


def test_paint_button_sends_the_image_and_the_canvas_result(images):
    button = images.paint_button(
        "imgcond_redux_paint1_txt2img",
        "hint",
        image="image1",
        mask=types.SimpleNamespace(elem_id="imgcond_redux_mask1_txt2img"),
        scratch="scratch",
    )
    (click,) = button.clicks
    assert click["inputs"] == ["image1", "scratch"] and click["fn"] is images.painted_mask
    assert click["js"] == "(image, data, mask) => imgcondPaint(image, mask, 'imgcond_redux_mask1_txt2img')"
    assert click["outputs"][0].elem_id == "imgcond_redux_mask1_txt2img"
