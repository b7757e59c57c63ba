"""Parameter specs: argument validation, named/positional API args, infotext round trips, image decoding."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from lib_imgcond.common.errors import ArgumentError
from lib_imgcond.spec.params import ImageInput, Param, Spec, decode_image, decode_mask

SPEC = Spec(
    "demo",
    "Demo",
    [
        Param("coef", "Coefficient", "float", 0.0, -1.0, 1.0, 0.01, xyz=True),
        Param("steps", "Steps", "int", 3, 1, 10),
        Param("hires", "Use in hires", "bool", False),
        Param("mode", "Mode", "choice", "Use", choices=("Off", "Record", "Use")),
        Param("name", "Reference", "str", ""),
        Param("image", "Image", "image", None),
    ],
)


def forge_infotext(entries: dict) -> str:
    """How Forge writes `key: value` pairs: str() of the value, JSON-quoted when it holds `,` `:` or a newline."""
    parts = []
    for k, v in entries.items():
        s = str(v)
        if any(c in s for c in ",:\n"):
            s = json.dumps(s, ensure_ascii=False)
        parts.append(f"{k}: {s}")
    return ", ".join(parts)


def forge_parse(line: str) -> dict:
    """The parameter-line half of Forge's parse_generation_parameters (same regex, same unquoting)."""
    out = {}
    for k, v in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', line):
        v = v.strip()
        if v.startswith('"') and v.endswith('"'):
            v = json.loads(v)
        out[k] = v
    return out


def test_positional_args_with_defaults():
    v = SPEC.parse([True, 0.5])
    assert v == {"enabled": True, "coef": 0.5, "steps": 3, "hires": False, "mode": "Use", "name": "", "image": None}


def test_named_dict_args_enable_by_default():
    v = SPEC.parse([{"coef": -0.3, "mode": "record"}, 0.0, 3])
    assert v["enabled"] is True and v["coef"] == -0.3 and v["mode"] == "Record"
    assert SPEC.parse([{"enabled": False}])["enabled"] is False


def test_unknown_named_arg_lists_the_known_ones():
    with pytest.raises(ArgumentError, match=r"demo\.coeff.*enabled, coef, steps"):
        SPEC.parse([{"coeff": 1}])


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        ([True, 1.5], r"demo\.coef=1\.5 .*\[-1, 1\]"),
        ([True, "x"], r"demo\.coef='x'"),
        ([True, True], r"demo\.coef=True"),
        ([True, float("nan")], r"demo\.coef=nan"),
        ([True, 0.0, 2.5], r"demo\.steps=2\.5 .*an integer in \[1, 10\]"),
        ([True, 0.0, 3, "yes"], r"demo\.hires='yes' .*true or false"),
        ([True, 0.0, 3, False, "Save"], r"demo\.mode='Save' .*'Off', 'Record', 'Use'"),
        (["on"], r"demo\.enabled='on'"),
        ([True, 0, 3, False, "Use", "", None, "extra"], r"at most 7 positional values"),
    ],
)
def test_bad_values_name_argument_value_and_range(args, pattern):
    with pytest.raises(ArgumentError, match=pattern):
        SPEC.parse(args)


def test_numeric_strings_and_ints_are_accepted():
    v = SPEC.parse([True, "0.25", 4.0, "true"])
    assert v["coef"] == 0.25 and v["steps"] == 4 and isinstance(v["steps"], int) and v["hires"] is True


def test_xyz_overrides_win():
    assert SPEC.parse([True, 0.1], overrides={"coef": 0.9})["coef"] == 0.9
    with pytest.raises(ArgumentError):
        SPEC.parse([True, 0.1], overrides={"coef": 9})


@pytest.mark.parametrize("coef", [0.0, 0.7, -0.3, 0.01, 1.0, -1.0, 0.123456789, 1 / 3])
def test_infotext_round_trip_is_exact(coef):
    values = SPEC.parse([{"coef": coef, "steps": 7, "hires": True, "mode": "Record", "name": "cat, v2: final"}])
    line = forge_infotext({"Steps": 20, "Sampler": "Euler a", **SPEC.infotext(values)})
    parsed = forge_parse(line)
    assert parsed["demo_enabled"] == "True"
    back = SPEC.paste(parsed)
    assert back == {k: values[k] for k in ("coef", "steps", "hires", "mode", "name")}
    assert type(back["steps"]) is int and type(back["coef"]) is float and back["hires"] is True


def test_infotext_skips_images_and_skip_list():
    keys = SPEC.infotext(SPEC.parse([True]), skip=("name",))
    assert "demo_image" not in keys and "demo_name" not in keys and keys["demo_enabled"] is True


def test_paste_ignores_unreadable_values():
    assert SPEC.paste({"demo_coef": "abc", "demo_steps": "99", "demo_mode": "Use"}) == {"mode": "Use"}


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_decode_base64_and_data_url():
    img = Image.new("RGB", (5, 4), (10, 20, 30))
    for s in (_png_b64(img), "data:image/png;base64," + _png_b64(img)):
        out = decode_image(s)
        assert isinstance(out, ImageInput) and out.image.size == (5, 4) and out.image.getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(ArgumentError, match="base64"):
        decode_image("not-an-image!!")
    assert decode_image("") is None and decode_image(None) is None


def test_decode_numpy_and_rgba():
    out = decode_image(np.full((3, 3, 3), 200, np.uint8))
    assert out.image.mode == "RGB" and out.image.getpixel((1, 1)) == (200, 200, 200)
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert decode_image(rgba).image.getpixel((0, 0)) == (0, 0, 0)


def test_decode_gradio_mask_dicts():
    base = Image.new("RGB", (4, 4), (1, 2, 3))
    stroke = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    stroke.putpixel((1, 2), (255, 255, 255, 255))
    g4 = decode_image({"background": base, "layers": [stroke], "composite": base})
    assert np.asarray(g4.mask).sum() == 255 and np.asarray(g4.mask)[2, 1] == 255
    assert decode_image({"background": base, "layers": [Image.new("RGBA", (4, 4))], "composite": base}).mask is None
    g3 = decode_image({"image": base, "mask": Image.new("RGB", (4, 4), (255, 255, 255))})
    assert np.asarray(g3.mask).min() == 255
    assert decode_mask(_png_b64(Image.new("L", (2, 2), 255))).mode == "L"


def test_spec_rejects_duplicate_or_reserved_names():
    with pytest.raises(ValueError, match="unique"):
        Spec("x", "X", [Param("enabled", "E", "bool", False)])


def test_advanced_params_leave_a_few_basic_controls_per_panel():
    from lib_imgcond.flexdiffuse import spec as flex_spec
    from lib_imgcond.mixing import spec as mixing_spec
    from lib_imgcond.redux import spec as redux_spec
    from lib_imgcond.refdrop import spec as refdrop_spec

    for spec, most in ((refdrop_spec.SPEC, 5), (mixing_spec.SPEC, 4), (flex_spec.SPEC, 7)):
        basic = [p.name for p in spec.params if p.name not in spec.advanced()]
        assert 0 < len(basic) <= most, (spec.prefix, basic)
    slot_basic = [f for f in redux_spec.SLOT_FIELDS if not redux_spec.SPEC.by_name[f"{f}1"].advanced]
    assert slot_basic == ["use", "image", "mask", "weight", "strength"]
    for k in range(2, redux_spec.SLOTS + 1):  # every slot groups its controls the same way
        assert [f for f in redux_spec.SLOT_FIELDS if not redux_spec.SPEC.by_name[f"{f}{k}"].advanced] == slot_basic


def test_empty_texts_are_not_written_and_paste_back_as_empty():
    from lib_imgcond.refdrop.spec import SPEC as REFDROP

    values = REFDROP.parse([{"mode": "Use", "reference": "cat"}])
    info = REFDROP.infotext(values)
    assert "refdrop_more_references" not in info and all(v != "" for v in info.values())
    back = REFDROP.paste({k: str(v) for k, v in info.items()})
    assert back["more_references"] == "" and back["reference"] == "cat"
    assert "more_references" not in REFDROP.paste({"Steps": "3"})  # no RefDrop in it: leave the control alone
