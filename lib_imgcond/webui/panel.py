"""Gradio components built from a `Spec`; works on Gradio 3.41 (A1111, reForge) and 4.40 (Forge)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import gradio as gr

from lib_imgcond.common.log import logger
from lib_imgcond.spec.params import Param, Spec

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


Row = tuple  # parameter names, and callables that build further components (e.g. tool buttons) in that place
Custom = Mapping[str, Callable[[Param, str], Any]]


def layout(spec: Spec, comps: dict, rows: list[Row], eid, custom: Custom | None = None, advanced_id: str = "advanced"):
    """Build `rows` in order; the rows of parameters the spec marks `advanced` go, in order, into one closed
    "Advanced" sub-accordion after the others. `custom[name](param, elem_id)` builds a parameter's component when the
    default one does not fit. A row must not mix basic and advanced parameters."""
    basic, extra = [], []
    for r in rows:
        flags = {spec.by_name[x].advanced for x in r if isinstance(x, str)} or {False}
        if len(flags) != 1:
            raise ValueError(f"{spec.prefix}: row {r} must hold only basic or only advanced parameters")
        (extra if flags.pop() else basic).append(r)
    build_rows(spec, comps, basic, eid, custom)
    if extra:
        with gr.Accordion("Advanced", open=False, elem_id=eid(advanced_id)):
            build_rows(spec, comps, extra, eid, custom)


def build_rows(spec: Spec, comps: dict, rows: list[Row], eid, custom: Custom | None = None) -> None:
    for r in rows:
        _build_row(spec, comps, r, eid, custom or {})


def on_demand(label: str, elem_id: str, build: Callable[[], None], shown: bool = False):
    """A button that reveals a group (built by `build`) and then hides itself: for optional extra image slots."""
    button = gr.Button(label, elem_id=elem_id, size="sm", visible=not shown)
    with gr.Group(visible=shown, elem_id=f"{elem_id}_group") as group:
        build()
    button.click(lambda: (gr.update(visible=True), gr.update(visible=False)), outputs=[group, button])
    return group


def _build_row(spec: Spec, comps: dict, r: Row, eid, custom: Custom) -> None:
    def build(item):
        if callable(item):
            item()
            return
        maker = custom.get(item, lambda param, elem_id: component(param, elem_id))
        comps[item] = maker(spec.by_name[item], eid(item))

    if len(r) == 1:
        build(r[0])
        return
    with gr.Row(equal_height=False):
        for item in r:
            build(item)


def tool_button(symbol: str, elem_id: str, tooltip: str):
    """The host's small square button (`ToolButton`) showing one of its symbols (`modules.ui.<symbol>_symbol`)."""
    try:
        from modules import ui
        from modules.ui_components import ToolButton
    except ImportError:  # not inside a WebUI
        return gr.Button(_SYMBOLS[symbol], elem_id=elem_id, scale=0, min_width=40)
    value = getattr(ui, f"{symbol}_symbol", _SYMBOLS[symbol])
    return ToolButton(value=value, elem_id=elem_id, tooltip=tooltip)


_SYMBOLS = {
    "refresh": "\U0001f504",
    "clear_prompt": "\U0001f5d1\ufe0f",
    "estimate": "\U0001f4cf",
    "gallery": "\U0001f4e5",  # take the selected result of the gallery
    "paint": "\U0001f58c\ufe0f",  # paint a mask
    "record": "\U0001f4cc",  # keep this result as a reference
}


def mask_upload(label: str, elem_id: str):
    """A plain image upload (no canvas editor: building several editors at once stalls the browser; masks are
    painted in one light canvas built on demand, `webui.images.paint_button`)."""
    return gr.Image(label=label, type="pil", elem_id=elem_id)


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
            fields.append((components[p.name], lambda d, p=p: spec.pasted(p, d)))
    return fields


def file_choices(first: str, lister: Callable[[], list[str]], what: str) -> list[str]:
    """A model-file dropdown's choices: `first` (e.g. Automatic), then the files `lister` finds; only `first` when
    the folders cannot be read (logged)."""
    try:
        return [first, *lister()]
    except OSError as e:
        logger.warning("cannot list %s: %s", what, e)
        return [first]
