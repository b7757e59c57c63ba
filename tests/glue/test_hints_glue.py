"""The hover hints: spec -> javascript/imgcond_hints.js -> the element ids the panels build.

The generated file must be current (like the docs' API blocks), hold one non-empty hint for every parameter and
every listed control of every technique, under the element id the panels give that control (`Spec.elem_id`, which
`webui.script.TechniqueScript.elem_ids` uses); read back from the file itself, not from the generator's map. The
scripts must name a hint for each tool button they build from `Spec.controls`, and the visible help stays short.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lib_imgcond.spec import hints
from lib_imgcond.spec.api_docs import SPECS
from lib_imgcond.spec.params import Param, Spec

ROOT = hints.ROOT
TEXT = hints.HINTS_JS.read_text(encoding="utf-8")


def file_map(text: str = TEXT) -> dict[str, str]:
    """The map in the JS file, parsed as JSON (the file is one object literal in JSON syntax)."""
    m = re.search(r"window\.imgcondHints = (\{.*\});\s*$", text, re.S)
    assert m, "no `window.imgcondHints = {...};` in the hints file"
    return json.loads(re.sub(r",\s*}$", "}", m.group(1)))


def test_the_hints_file_is_current():
    assert hints.render() == TEXT, "javascript/imgcond_hints.js is stale: run python -m lib_imgcond.spec.hints --write"
    assert hints.main([]) == 0


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.prefix)
def test_every_parameter_and_control_has_its_hint_under_its_element_id(spec):
    found = file_map()
    for name in [p.name for p in spec.params] + list(spec.controls):
        key = spec.elem_id(name, "txt2img")[: -len("_txt2img")]
        assert key == spec.elem_id(name, "img2img")[: -len("_img2img")]
        assert found.get(key, "").strip(), f"{spec.prefix}: no hint for {name} ({key})"
    mine = {k for k in found if k.startswith(f"imgcond_{spec.prefix}_")}
    assert len(mine) >= len(spec.params) + len(spec.controls)


def test_the_file_holds_nothing_else_and_counts_match():
    total = sum(len(s.params) + len(s.controls) for s in SPECS)
    assert len(file_map()) == total  # no stale ids of removed controls (prefixes never nest: hrmix, redux, …)
    assert all(s.controls.get("enabled") for s in SPECS), "each panel's enable switch has a hint"


def test_a_missing_hint_is_refused_by_name():
    spec = Spec("demo", "Demo", [Param("a", "A", "bool", False, hint="ok"), Param("b", "B", "bool", False)])
    with pytest.raises(ValueError, match=r"demo: no hint .* \['b'\]"):
        hints.render((spec,))
    spec = Spec("demo", "Demo", [Param("a", "A", "bool", False, hint="ok")], controls={"go": "two\nlines"})
    with pytest.raises(ValueError, match=r"\['go'\]"):
        hints.render((spec,))


def test_a_stale_file_is_reported(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "imgcond_hints.js"
    stale.write_text(TEXT.replace(next(iter(file_map().values())), "old text"), encoding="utf-8")
    monkeypatch.setattr(hints, "HINTS_JS", stale)
    monkeypatch.setattr(hints, "ROOT", tmp_path)
    assert hints.main([]) == 1 and "stale" in capsys.readouterr().err
    assert hints.main(["--write"]) == 0 and stale.read_text(encoding="utf-8") == TEXT


SCRIPTS = {
    "imgcond_refdrop.py": "refdrop",
    "imgcond_redux.py": "redux",
    "imgcond_clip_guidance.py": "flexdiffuse",
    "imgcond_style_model.py": "style_model",
    "imgcond_unclip.py": "unclip",
    "imgcond_hires_mixing.py": "hrmix",
}


def test_the_scripts_take_tool_button_hints_from_the_specs():
    """Every `SPEC.controls["x"]` a script names exists, and no tool button carries a literal tooltip of its own."""
    specs = {s.prefix: s for s in SPECS}
    assert sorted(SCRIPTS) == sorted(p.name for p in (ROOT / "scripts").glob("imgcond_*.py") if p.stem != "imgcond_api")
    for name, prefix in SCRIPTS.items():
        text = (ROOT / "scripts" / name).read_text(encoding="utf-8")
        assert not re.search(r"tool_button\([^)]*,\s*\"", text), f"{name}: a tool button with a literal hint"
        for control in re.findall(r"SPEC\.controls\[\"(\w+)\"\]", text):
            assert control in specs[prefix].controls, f"{name}: {control!r} is not a control of {prefix}"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.prefix)
def test_visible_help_is_short_and_the_hint_says_more(spec):
    """The line under a control is what one reads before touching it; the rest is in the hint."""
    for p in spec.params:
        assert len(p.info) <= 60, f"{spec.prefix}.{p.name}: visible help of {len(p.info)} characters"
        assert len(p.hint) > len(p.info), f"{spec.prefix}.{p.name}: the hint says less than the visible help"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_javascript_files_parse():
    for path in sorted((ROOT / "javascript").glob("*.js")):
        done = subprocess.run(["node", "--check", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, f"{path.name}: {done.stderr}"


def test_the_hints_reach_the_page_through_the_ui_script():
    """imgcond_ui.js reads the generated map by the name the file defines, and adds the tab suffixes the panels'
    ids end with."""
    ui = (ROOT / "javascript" / "imgcond_ui.js").read_text(encoding="utf-8")
    assert "window.imgcondHints" in ui and all(f'"{tab}"' in ui for tab in hints.TABS)
    assert '"_" + tab' in ui.replace("'", '"')
    assert Path(hints.HINTS_JS).parent == ROOT / "javascript"
