"""The panels' image inputs and their tool buttons: take a result from the tab's gallery, paint a mask.

* Gallery (📥): the results gallery (`txt2img_gallery` / `img2img_gallery`) is built after the scripts' panels, so
  a button only records its target here; `GalleryLinks.connect` wires every recorded button once the host creates
  that tab's gallery (`Script.on_after_component`). In the browser `imgcondGalleryPick` (javascript/imgcond_ui.js)
  sends the gallery's selected image (else its first) and the host's own converter makes it a PIL image.
* Brush (🖌️): `imgcondPaint` (javascript/imgcond_paint.js) opens one light canvas over the image, built when the
  button is pressed and removed when done (no canvas editor sits in the page: building one per slot stalled the
  browser). The painted mask comes back as a PNG data URL and becomes the value of the slot's mask upload, so it
  is prepared exactly as an uploaded mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from lib_imgcond.common.log import logger
from lib_imgcond.spec.params import decode_mask
from lib_imgcond.webui import panel

TABS = ("txt2img", "img2img")
JS_KEY = "js" if panel.GRADIO4 else "_js"


def tab_of(is_img2img: bool) -> str:
    return TABS[1] if is_img2img else TABS[0]


def image_input(label: str, elem_id: str, tools: Callable[[Any], None], **kw: Any):
    """An image upload with a narrow column of tool buttons (built by `tools(image)`) at its right. Returns the
    image; `kw` goes to the row (e.g. `visible`)."""
    with gr.Row(equal_height=False, elem_classes=["imgcond-image-row"], **kw) as row:
        image = gr.Image(label=label, type="pil", elem_id=elem_id)
        with gr.Column(scale=0, min_width=48, elem_classes=["imgcond-image-tools"]):
            tools(image)
    image.imgcond_row = row  # for callers that show and hide the input with its buttons
    return image


def result_image(value: Any):
    """The PIL image of what `imgcondGalleryPick` sent (a one-item gallery), or None when the gallery is empty."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return None
    try:
        from modules.infotext_utils import image_from_url_text
    except ImportError:  # not inside a WebUI
        item = value[0] if isinstance(value, list) else value
        return item[0] if isinstance(item, tuple) else item
    return image_from_url_text(value)


class GalleryLinks:
    """Gallery buttons waiting for their tab's results gallery."""

    def __init__(self):
        self.pending: dict[str, list[tuple[Any, list, Callable]]] = {tab: [] for tab in TABS}

    def register(self, script) -> None:
        """Connect this script's buttons when the host creates each tab's gallery (A1111 ≥ 1.7, Forge, Neo)."""
        register = getattr(script, "on_after_component", None)
        for tab in TABS if register else ():
            register(lambda c, t=tab: self.connect(t, c.component), elem_id=f"{tab}_gallery")

    def button(self, tab: str, elem_id: str, hint: str, outputs: list, fill: Callable | None = None):
        """A 📥 tool button that puts the gallery's selected result into `outputs` (one image input by default;
        `fill(image)` returns the values of several outputs)."""
        return self.add(tab, panel.tool_button("gallery", elem_id, hint), outputs, fill)

    def add(self, tab: str, button, outputs: list, fill: Callable | None = None):
        """Let an existing `button` take the gallery's selected result (see `button`)."""
        self.pending[tab].append((button, outputs, fill or (lambda image: image)))
        return button

    def connect(self, tab: str, gallery) -> None:
        for button, outputs, fill in self.pending[tab]:
            none = gr.update() if len(outputs) == 1 else [gr.update()] * len(outputs)

            def take(value, fill=fill, none=none):
                image = result_image(value)
                if image is None:
                    gr.Warning("No result in the gallery yet: generate an image first")
                    return none
                return fill(image)

            button.click(
                fn=take, inputs=[gallery], outputs=outputs, show_progress=panel.NO_PROGRESS,
                **{JS_KEY: f"(gallery) => imgcondGalleryPick('{tab}', gallery)"},
            )  # fmt: skip
        if self.pending[tab]:
            logger.debug("imgcond: %d gallery buttons connected in %s", len(self.pending[tab]), tab)
        self.pending[tab].clear()


def painted_mask(image, data_url: str):
    """The mask painted in the browser as the mask input's value (a grayscale image, white = keep), at the image's
    size; no change when the painting was cancelled."""
    if not data_url:
        return gr.update()
    mask = decode_mask(data_url, "painted mask")
    if image is not None and mask.size != image.size:
        mask = mask.resize(image.size)
    return mask


def scratch(elem_id: str):
    """The hidden textbox that carries a painted mask to the server (one per panel and tab)."""
    return gr.Textbox(visible=False, elem_id=elem_id)


def paint_button(elem_id: str, hint: str, image, mask, scratch):
    """A 🖌️ tool button: paint `mask` over `image` in the browser. `scratch` is a hidden Textbox of the panel that
    carries the painted PNG to the server (any number of buttons may share it)."""
    button = panel.tool_button("paint", elem_id, hint)
    mask_id = mask.elem_id
    button.click(
        fn=painted_mask, inputs=[image, scratch], outputs=[mask], show_progress=panel.NO_PROGRESS,
        **{JS_KEY: f"(image, data, mask) => imgcondPaint(image, mask, '{mask_id}')"},
    )  # fmt: skip
    return button
