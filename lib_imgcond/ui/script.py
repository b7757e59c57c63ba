"""What every technique's always-on script shares: title, visibility and element ids from its Spec.

A mixin, not a `modules.scripts.Script` subclass: the WebUI instantiates every Script subclass it finds in a script
module, so the shared part must not be one.
"""

from __future__ import annotations

from collections.abc import Callable

from lib_imgcond.ui.spec import Spec


class TechniqueScript:
    spec: Spec
    txt2img_only = False

    def title(self):
        return self.spec.title

    def show(self, is_img2img):
        from modules import scripts

        return False if (self.txt2img_only and is_img2img) else scripts.AlwaysVisible

    def elem_ids(self, is_img2img) -> Callable[[str], str]:
        """`name` → a unique element id for this technique and tab."""
        tab = "img2img" if is_img2img else "txt2img"
        return lambda name: f"imgcond_{self.spec.prefix}_{name}_{tab}"
