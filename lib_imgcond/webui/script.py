"""What every technique's always-on script shares: title, visibility and element ids from its Spec.

A mixin, not a `modules.scripts.Script` subclass: the WebUI instantiates every Script subclass it finds in a script
module, so the shared part must not be one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.common.log import logger
from lib_imgcond.host import capabilities as host
from lib_imgcond.host import forge, progress
from lib_imgcond.spec.params import Spec
from lib_imgcond.webui import images, panel, xyz


class TechniqueScript:
    spec: Spec
    txt2img_only = False

    def __init__(self):
        super().__init__()
        self.gallery_links = images.GalleryLinks()
        self.gallery_links.register(self)

    def title(self):
        return self.spec.title

    def show(self, is_img2img):
        from modules import scripts

        return False if (self.txt2img_only and is_img2img) else scripts.AlwaysVisible

    def elem_ids(self, is_img2img) -> Callable[[str], str]:
        """`name` → a unique element id for this technique and tab."""
        tab = "img2img" if is_img2img else "txt2img"
        return lambda name: self.spec.elem_id(name, tab)

    def image_input(self, is_img2img, param, elem_id: str, **row):
        """`param`'s image upload with a 📥 button at its right (control `gallery_<name>`): the result selected in
        the tab's gallery goes into it. `row` goes to the row holding both (e.g. `visible`)."""
        eid, name = self.elem_ids(is_img2img), f"gallery_{param.name}"

        def tools(image):
            self.gallery_links.button(images.tab_of(is_img2img), eid(name), self.spec.controls[name], [image])

        return images.image_input(param.label, elem_id, tools, **row)

    def mask_input(self, is_img2img, param, elem_id: str, k: int, image, scratch):
        """Slot `k`'s mask upload with a 🖌️ button at its right (control `paint<k>`): paint the mask over `image`
        (`scratch`: the panel's hidden textbox, `images.scratch`)."""
        eid, name = self.elem_ids(is_img2img), f"paint{k}"

        def tools(mask):
            images.paint_button(eid(name), self.spec.controls[name], image, mask, scratch)

        return images.image_input(param.label, elem_id, tools)

    def finish_ui(self, enabled, comps: dict) -> list:
        """Paste-back fields from the spec, and the component list `ui()` returns."""
        self.infotext_fields = panel.infotext_fields(self.spec, enabled, comps)
        self.paste_field_names = [self.spec.key(x.name) for x in self.spec.params if x.infotext]
        return panel.ordered(self.spec, enabled, comps)

    def prepare_args(self, args: Sequence[Any]) -> Sequence[Any]:
        """Hook: rewrite raw hook arguments before validation (e.g. an API shorthand)."""
        return args

    def host_notice(self) -> None:
        """Inside the accordion: one line saying the technique cannot run on this WebUI (nothing on Forge/Neo)."""
        text = host.notice(self.spec.title)
        if text:
            import gradio as gr

            gr.Markdown(text)

    def parse_args(self, p, args: Sequence[Any]) -> dict:
        """Validated values (X/Y/Z overrides applied); on bad input, or on a WebUI without Forge's patcher, the job
        is stopped with the message."""
        try:
            values = self.spec.parse(self.prepare_args(args), xyz.overrides(p, self.spec))
            if values["enabled"]:
                host.require_forge(p, self.spec.title)
            return values
        except ImgcondError as e:
            stop(p, e)
            return {"enabled": False}

    def start_job(self, p, args: Sequence[Any], key: str, plan: Callable[[dict], Any], status: str = "") -> Any:
        """`process()` of a technique that plans once per job: parse the args, run `plan(values)` (with `status` in
        the WebUI's progress area while it loads and encodes) and keep the job on `p` under `key`. On a user error the
        generation stops with its message. Returns the job, or None when off or stopped."""
        forge.drop_job_state(p, key)
        values = self.parse_args(p, args)
        if not values["enabled"]:
            return None
        try:
            with progress.status(status) if status else contextlib.nullcontext():
                job = plan(values)
        except ImgcondError as e:
            stop(p, e)
            return None
        forge.job_state(p, key, lambda: job)
        return job


def stop(p, error: ImgcondError) -> None:
    """Log a user error in one line and stop the job before it samples."""
    logger.error("%s", error)
    forge.abort_generation(p, error)
