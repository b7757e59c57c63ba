"""Parameter specifications shared by the UI, the infotext, the API and the X/Y/Z plot.

One `Spec` per technique lists its parameters once. From it come the Gradio components (`webui`), the infotext keys
(`<prefix>_<name>`), the paste-back converters, the validation of positional and named API arguments and the X/Y/Z axes.
This module imports no WebUI code and no Gradio, so it is unit-tested on its own.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lib_imgcond.common.errors import ArgumentError

KINDS = ("bool", "float", "int", "choice", "str", "image")


@dataclass(frozen=True)
class ImageInput:
    """An image from the UI or the API, with an optional mask (white = selected)."""

    image: Any  # PIL.Image.Image, RGB
    mask: Any = None  # PIL.Image.Image, mode "L", or None


@dataclass(frozen=True)
class Param:
    name: str
    label: str
    kind: str
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    info: str = ""
    """The short help shown under the control: what a user must read before touching it (units, ranges)."""
    hint: str = ""
    """The full help, shown when the pointer rests on the control (javascript/imgcond_hints.js, generated from
    the specs by lib_imgcond.spec.hints) and used as the API reference's meaning where the prose has none."""
    infotext: bool = True
    xyz: bool = False
    advanced: bool = False
    """Shown in the panel's "Advanced" sub-accordion (the few controls most users touch stay outside it)."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown parameter kind {self.kind!r}")
        if self.kind == "image":
            object.__setattr__(self, "infotext", False)

    @property
    def allowed(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind in ("float", "int"):
            word = "a number" if self.kind == "float" else "an integer"
            return f"{word} in [{_num(self.minimum)}, {_num(self.maximum)}]"
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "image":
            return "an image (PIL image, numpy array or base64 string) or null"
        return "a string"

    def coerce(self, value: Any, arg_name: str | None = None) -> Any:
        """`value` converted to this parameter's type, or ArgumentError naming it and the allowed values."""
        name = arg_name or self.name
        bad = ArgumentError(name, _short(value), self.allowed)
        kind = self.kind
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "false"):
                return value.strip().lower() == "true"
            raise bad
        if kind in ("float", "int"):
            if isinstance(value, bool):
                raise bad
            if isinstance(value, str):
                try:
                    value = float(value.strip())
                except ValueError:
                    raise bad from None
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad
            if kind == "int":
                if float(value) != int(value):
                    raise bad
                value = int(value)
            else:
                value = float(value)
            too_low = self.minimum is not None and value < self.minimum
            if too_low or (self.maximum is not None and value > self.maximum):
                raise bad
            return value
        if kind == "choice":
            if isinstance(value, str):
                for choice in self.choices:
                    if value == choice or value.strip().lower() == choice.lower():
                        return choice
            raise bad
        if kind == "str":
            if value is None:
                return ""
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            if isinstance(value, str):
                return value
            raise bad
        return decode_image(value, name)

    def to_infotext(self, value: Any) -> Any:
        """The value as written into the infotext (Forge quotes strings holding `,` `:` or newlines)."""
        if self.kind == "float":
            return float(value)
        return value

    def from_infotext(self, text: Any) -> Any:
        """Parse an infotext value back; None when absent or unreadable (the component then keeps its value)."""
        if text is None:
            return None
        try:
            return self.coerce(text if not isinstance(text, str) else text.strip())
        except ArgumentError:
            return None


END_INFO = "at start: never applies"
GALLERY_HINT = "Put the image selected in this tab's results gallery (else its first image) here"
START_HINT = (
    "Where in the sampling the technique starts acting, as a fraction (0 = from the first step). With End at it forms "
    "the step window; outside it the generation is exactly as without the technique."
)
END_HINT = "Where it stops acting (1 = until the last step). End at = Start at: the technique never applies."


def step_window(
    start_info: str, *, xyz: bool = True, advanced: bool = False, start_hint: str = START_HINT
) -> tuple[Param, Param]:
    """The `start` / `end` pair of a technique's step window: fractions of the sampling, `end` = `start` empty."""
    return (
        Param(
            "start", "Start at", "float", 0.0, 0.0, 1.0, 0.01, xyz=xyz, info=start_info, advanced=advanced,
            hint=start_hint,
        ),
        Param(
            "end", "End at", "float", 1.0, 0.0, 1.0, 0.01, xyz=xyz, info=END_INFO, advanced=advanced, hint=END_HINT
        ),
    )  # fmt: skip


@dataclass
class Spec:
    """The parameters of one technique. `prefix` is its infotext key prefix and API namespace."""

    prefix: str
    title: str
    params: list[Param]
    controls: dict[str, str] = field(default_factory=dict)
    """The panel's other controls (buttons, the enable switch, previews): element name -> hover hint. With the
    parameters' hints they make the hints file (lib_imgcond.spec.hints)."""
    by_name: dict[str, Param] = field(init=False)

    def __post_init__(self):
        self.by_name = {p.name: p for p in self.params}
        if len(self.by_name) != len(self.params) or "enabled" in self.by_name:
            raise ValueError("parameter names must be unique and not 'enabled'")
        if set(self.controls) & set(self.by_name):
            raise ValueError(f"{self.prefix}: controls {sorted(set(self.controls) & set(self.by_name))} are parameters")

    def elem_id(self, name: str, tab: str) -> str:
        """The element id of the panel's control `name` in `tab` ("txt2img" / "img2img")."""
        return f"imgcond_{self.prefix}_{name}_{tab}"

    def hints(self) -> dict[str, str]:
        """Element name -> hover hint of every parameter and every other control of the panel."""
        return {**{p.name: p.hint for p in self.params}, **self.controls}

    @property
    def enabled_key(self) -> str:
        return f"{self.prefix}_enabled"

    def key(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    def advanced(self) -> list[str]:
        """Names of the parameters the panel puts into its "Advanced" sub-accordion."""
        return [p.name for p in self.params if p.advanced]

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def parse(self, args: Sequence[Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Validate hook arguments: `(enabled, p1, p2, ...)` as the UI and positional API send them, or a single dict of
        named arguments (`{"enabled": true, "name": value, ...}`; `enabled` defaults to true there). Missing values take
        their defaults. `overrides` (from the X/Y/Z plot) win over both. Returns `{"enabled": bool, name: value, ...}`.
        """
        values: dict[str, Any] = {"enabled": False, **self.defaults()}
        args = list(args)
        if args and isinstance(args[0], Mapping):
            named = dict(args[0])
            unknown = sorted(set(named) - set(self.by_name) - {"enabled"})
            if unknown:
                allowed = ", ".join(["enabled", *self.by_name])
                bad_name = unknown[0]
                raise ArgumentError(f"{self.prefix}.{bad_name}", named[bad_name], f"a known argument name: {allowed}")
            values["enabled"] = True
            values.update(named)
        else:
            if len(args) > len(self.params) + 1:
                raise ArgumentError(
                    f"{self.prefix} args", f"{len(args)} values", f"at most {len(self.params) + 1} positional values"
                )
            names = ["enabled", *self.by_name]
            values.update(dict(zip(names, args, strict=False)))
        if overrides:
            values.update(overrides)
        out = {"enabled": _ENABLED.coerce(values["enabled"], f"{self.prefix}.enabled")}
        for p in self.params:
            out[p.name] = p.coerce(values[p.name], f"{self.prefix}.{p.name}")
        return out

    def infotext(self, values: Mapping[str, Any], skip: Sequence[str] = ()) -> dict[str, Any]:
        """Infotext entries for an enabled technique: every scalar parameter under `<prefix>_<name>`."""
        out: dict[str, Any] = {self.enabled_key: True}
        for p in self.params:
            if p.infotext and p.name not in skip and values[p.name] != "":  # no empty values (see `pasted`)
                out[self.key(p.name)] = p.to_infotext(values[p.name])
        return out

    def pasted(self, p: Param, params: Mapping[str, Any]) -> Any:
        """The value of `p` read back from parsed infotext; None (leave the control alone) when absent or unreadable.
        An empty text is not written, so in an infotext of this technique a missing text parameter means ""."""
        key = self.key(p.name)
        if key not in params:
            enabled = params.get(self.enabled_key) in (True, "True", "true")
            return "" if enabled and p.kind == "str" else None
        return p.from_infotext(params[key])

    def paste(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Values read back from parsed infotext, for the keys present."""
        out = {}
        for p in self.params:
            if p.infotext:
                value = self.pasted(p, params)
                if value is not None:
                    out[p.name] = value
        return out

    def api_table(self) -> str:
        """A Markdown table of the named arguments, for the docs."""
        rows = ["| name | type | default | allowed |", "|---|---|---|---|", "| `enabled` | bool | true (dict form) | |"]
        for p in self.params:
            rows.append(f"| `{p.name}` | {p.kind} | `{p.default!r}` | {p.allowed} |")
        return "\n".join(rows)


_ENABLED = Param("enabled", "Enabled", "bool", False)


def decode_image(value: Any, name: str = "image") -> ImageInput | None:
    """Accept None, "", a PIL image, a numpy array, a base64 string (optionally a data URL), or the dicts Gradio 3
    (`{"image", "mask"}`) and Gradio 4 (`{"background", "layers", "composite"}`) produce. Returns ImageInput or None."""
    from PIL import Image

    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, ImageInput):
        return value
    if isinstance(value, Mapping):
        if "image" in value:
            image = decode_image(value.get("image"), name)
            mask = decode_image(value.get("mask"), f"{name}.mask") if value.get("mask") is not None else None
            if image is None:
                return None
            return ImageInput(image.image, _mask_from(mask.image) if mask else None)
        if "background" in value or "composite" in value:
            base = decode_image(value.get("background") or value.get("composite"), name)
            if base is None:
                return None
            mask = None
            for layer in value.get("layers") or []:
                layer_img = decode_image(layer, f"{name}.layer")
                if layer_img is not None:
                    alpha = _mask_from(layer_img.image)
                    mask = alpha if mask is None else Image.fromarray(_max_u8(mask, alpha))
            if mask is not None and not mask.getbbox():
                mask = None
            return ImageInput(base.image, mask)
        raise ArgumentError(name, _short(value), "an image, or a dict with 'image' and optional 'mask'")
    if isinstance(value, Image.Image):
        return ImageInput(_rgb(value))
    if isinstance(value, str):
        data = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            raw = base64.b64decode(data, validate=False)
            img = Image.open(io.BytesIO(raw))
            img.load()
        except Exception:
            raise ArgumentError(name, _short(value), "a base64-encoded PNG/JPEG/WebP image") from None
        return ImageInput(_rgb(img))
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            arr = value
            if arr.dtype != np.uint8:
                arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
            return ImageInput(_rgb(Image.fromarray(arr)))
    except ImportError:  # pragma: no cover
        pass
    raise ArgumentError(name, _short(value), "an image (PIL image, numpy array or base64 string) or null")


def decode_mask(value: Any, name: str = "mask"):
    """A mask given on its own (API): an image of any mode; white/opaque = selected. Returns a PIL "L" image or None."""
    img = decode_image(value, name)
    return None if img is None else _mask_from(img.image)


def _rgb(img):
    if img.mode == "RGBA":
        from PIL import Image

        canvas = Image.new("RGB", img.size, (0, 0, 0))
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB") if img.mode != "RGB" else img


def _mask_from(img):
    """Masks: the alpha channel of an RGBA/LA image (Gradio 4 editor layers), else the luminance (white = selected)."""
    if img.mode in ("RGBA", "LA"):
        return img.getchannel("A")
    return img.convert("L")


def _max_u8(a, b):
    import numpy as np

    return np.maximum(np.asarray(a, dtype=np.uint8), np.asarray(b, dtype=np.uint8))


def _num(x: float | None) -> str:
    if x is None:
        return "…"
    return str(int(x)) if float(x).is_integer() else str(x)


def _short(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 40:
        return value[:37] + "..."
    return value
