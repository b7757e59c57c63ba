"""Gradio components built from a `Spec`; works on Gradio 3.41 (A1111, reForge) and 4.40 (Forge)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gradio as gr

from lib_imgcond.ui.spec import Param, Spec

GRADIO4 = int(gr.__version__.split(".")[0]) >= 4
NO_PROGRESS = "hidden" if GRADIO4 else False  # `show_progress` for quiet live updates (Gradio 4 takes a string)


def component(param: Param, elem_id: str, **overrides: Any):
    """One Gradio input for `param`, labelled and ranged from the spec."""
    kw: dict[str, Any] = {"label": param.label, "elem_id": elem_id}
    if param.info:
        kw["info"] = param.info
    kw.update(overrides)
    kind = param.kind
    if kind == "bool":
        return gr.Checkbox(value=param.default, **kw)
    if kind in ("float", "int"):
        return gr.Slider(
            value=param.default, minimum=param.minimum, maximum=param.maximum, step=param.step or 0.01, **kw
        )
    if kind == "choice":
        if len(param.choices) <= 4 and "info" not in overrides:
            return gr.Radio(choices=list(param.choices), value=param.default, **kw)
        return gr.Dropdown(choices=list(param.choices), value=param.default, **kw)
    if kind == "str":
        return gr.Textbox(value=param.default, lines=1, **kw)
    kw.pop("info", None)
    return gr.Image(type="pil", **kw)


def row(spec: Spec, comps: dict, names: tuple[str, ...] | list[str], eid) -> None:
    """One gr.Row holding the components of `names` (added to `comps`), ids from `eid(name)`."""
    with gr.Row():
        for name in names:
            comps[name] = component(spec.by_name[name], eid(name))


def mask_image(label: str, elem_id: str):
    """An image input the user can draw a mask on (white = selected)."""
    if GRADIO4:
        return gr.ImageEditor(label=label, type="pil", elem_id=elem_id, brush=gr.Brush(colors=["#ffffff"]))
    return gr.Image(label=label, type="pil", tool="sketch", elem_id=elem_id)


def ordered(spec: Spec, enabled, components: Mapping[str, Any]) -> list:
    """The component list `ui()` returns: the enable switch, then one component per parameter in spec order."""
    missing = [p.name for p in spec.params if p.name not in components]
    if missing:
        raise ValueError(f"{spec.prefix}: no component for {missing}")
    return [enabled, *(components[p.name] for p in spec.params)]


def infotext_fields(spec: Spec, enabled, components: Mapping[str, Any]) -> list[tuple]:
    """`Script.infotext_fields` entries: the enable switch follows `<prefix>_enabled`, every scalar its own key."""
    fields: list[tuple] = [(enabled, lambda d, k=spec.enabled_key: d.get(k, "False") in (True, "True", "true"))]
    for p in spec.params:
        if p.infotext:
            fields.append((components[p.name], _paster(p, spec.key(p.name))))
    return fields


def _paster(param: Param, key: str):
    return lambda d: param.from_infotext(d.get(key))
