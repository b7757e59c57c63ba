"""The docs' API reference agrees with the specs: each technique's generated block in its page (docs/<technique>.md) is
current, and — read back independently of the generator — every table and positional form names the spec's parameters
in order, with their defaults, ranges and choices. Also: every relative link of README.md and docs/*.md resolves."""

from __future__ import annotations

import json
import re

import pytest

from lib_imgcond.spec import api_docs
from lib_imgcond.spec.api_prose import DOCS, Doc
from lib_imgcond.spec.params import Param, Spec

ROOT = api_docs.README.parent
SPECS = {spec.prefix: spec for spec in api_docs.SPECS}
TEXTS = {prefix: api_docs.doc_path(prefix).read_text(encoding="utf-8") for prefix in SPECS}


@pytest.mark.parametrize("prefix", sorted(SPECS))
def test_generated_blocks_are_current(prefix):
    text = TEXTS[prefix]
    assert api_docs.render(text, [prefix]) == text, (
        f"{api_docs.DOC_FILES[prefix]} is stale: run python -m lib_imgcond.spec.api_docs --write"
    )


def test_the_check_command_passes():
    assert api_docs.main([]) == 0


def test_every_technique_has_its_own_page_and_the_readme_no_block():
    assert set(api_docs.DOC_FILES) == set(SPECS)
    assert len(set(api_docs.DOC_FILES.values())) == len(SPECS)
    assert "<!-- api:" not in api_docs.README.read_text(encoding="utf-8")


def block_of(prefix: str) -> str:
    m = re.search(rf"<!-- api:{prefix} -->\n(.*?)\n<!-- /api:{prefix} -->", TEXTS[prefix], re.S)
    assert m, f"no API block for {prefix}"
    return m.group(1)


def positional_names(block: str) -> list[str]:
    m = re.search(r"Positional form.*?: `\[(.*?)\]`", block, re.S)
    assert m
    out = []
    for item in re.split(r",\s*(?![^{]*\})", " ".join(m.group(1).split())):
        group = re.fullmatch(r"\{(.*)\} for k = 1…(\d)", item.strip())
        if group:
            bases = [b.strip()[:-1] for b in group.group(1).split(",")]
            out += [f"{b}{k}" for k in range(1, int(group.group(2)) + 1) for b in bases]
        else:
            out.append(item.strip())
    return out


def table_rows(block: str) -> list[list[str]]:
    lines = [line for line in block.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.mark.parametrize("prefix", sorted(SPECS))
def test_positional_form_is_the_spec_order(prefix):
    assert positional_names(block_of(prefix)) == ["enabled", *(p.name for p in SPECS[prefix].params)]


@pytest.mark.parametrize("prefix", sorted(SPECS))
def test_table_rows_match_the_spec(prefix):
    spec = SPECS[prefix]
    rows = {}
    order = []
    for name, kind, default, allowed, meaning in table_rows(block_of(prefix)):
        name = name.strip("`")
        if name.endswith("k") and f"{name[:-1]}1" in spec.by_name:
            name = f"{name[:-1]}1"  # slot k: checked against slot 1 (the generator checks 2…n repeat it)
        order.append(name)
        rows[name] = (kind, default, allowed, meaning)
    documented = [n for n in order if n in spec.by_name]
    expected = [
        p.name
        for p in spec.params
        if not (p.name[-1].isdigit() and p.name[-1] != "1" and p.name[:-1] + "1" in spec.by_name)
    ]
    assert order[0] == "enabled" and documented == expected
    for name in documented:
        p = spec.by_name[name]
        kind, default, allowed, meaning = rows[name]
        assert kind == p.kind and meaning, name
        assert json.loads(default.strip("`")) == p.default, name
        if p.kind == "choice":
            assert re.findall(r'`"([^"]+)"`', allowed) == list(p.choices), name
        if p.kind in ("float", "int") and "[" in allowed:
            lo, hi = map(float, re.search(r"\[([-\d.]+), ([-\d.]+)\]", allowed).groups())
            assert (lo, hi) == (p.minimum, p.maximum), name


def test_refdrop_lists_mode_image_and_its_image_argument():
    rows = {r[0].strip("`"): r for r in table_rows(block_of("refdrop"))}
    assert '`"Image"`' in rows["mode"][3] and rows["image"][1] == "image"
    assert positional_names(block_of("refdrop"))[12:14] == ["image", "record_every"]  # 13th and 14th


def test_a_spec_change_makes_the_page_stale(monkeypatch):
    redux = SPECS["redux"]
    grown = Spec(redux.prefix, redux.title, [*redux.params, Param("extra", "Extra", "bool", False, info="new")])
    monkeypatch.setattr(api_docs, "SPECS", tuple(grown if s is redux else s for s in api_docs.SPECS))
    assert api_docs.render(TEXTS["redux"], ["redux"]) != TEXTS["redux"]
    assert api_docs.main([]) == 1  # the check command sees it too
    bare = Spec(redux.prefix, redux.title, [*redux.params, Param("undocumented", "U", "bool", False)])
    with pytest.raises(ValueError, match="no meaning for \\['undocumented'\\]"):
        api_docs.table(bare)
    monkeypatch.setitem(DOCS, "redux", {**DOCS["redux"], "gone": Doc("x")})
    with pytest.raises(ValueError, match="without a parameter \\['gone'\\]"):
        api_docs.table(redux)


def _copy_pages(tmp_path, monkeypatch):
    """The pages copied under tmp_path, and api_docs pointed there."""
    for rel in api_docs.DOC_FILES.values():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((ROOT / rel).read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(api_docs, "README", tmp_path / "README.md")


def test_a_stale_page_on_disk_fails_the_check_and_write_repairs_it(tmp_path, monkeypatch, capsys):
    _copy_pages(tmp_path, monkeypatch)
    page = tmp_path / api_docs.DOC_FILES["unclip"]
    good = page.read_text(encoding="utf-8")
    page.write_text(good.replace("| `strengthk` | float | `1.0`", "| `strengthk` | float | `2.0`"), encoding="utf-8")
    assert api_docs.main([]) == 1
    assert "docs/unclip.md" in capsys.readouterr().err
    assert api_docs.main(["--write"]) == 0
    assert page.read_text(encoding="utf-8") == good and api_docs.main([]) == 0


def test_a_page_without_its_markers_is_an_error(tmp_path, monkeypatch):
    _copy_pages(tmp_path, monkeypatch)
    page = tmp_path / api_docs.DOC_FILES["hrmix"]
    page.write_text(page.read_text(encoding="utf-8").replace("<!-- /api:hrmix -->", ""), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape("docs/hires-mixing.md: no <!-- api:hrmix -->")):
        api_docs.main([])


# --- links -----------------------------------------------------------------------------------------------------------
# UI screenshots of the technique panels (the browser tier, tests/ui, takes them; docs/images/ keeps a copy)
SCREENSHOTS = {
    f"docs/images/{name}.png" for name in ("refdrop", "redux", "hires-mixing", "clip-guidance", "style-model", "unclip")
}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(text: str) -> list[str]:
    """The link targets of a Markdown text that point into the repository (no scheme, not a bare #anchor)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def markdown_files() -> list:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for target in relative_links(path.read_text(encoding="utf-8")):
        file = (path.parent / target.split("#")[0]).resolve()
        if not file.exists():
            broken.append(target)
    assert not broken, f"{path.name}: links to missing files {broken}"


def test_the_link_check_finds_a_broken_link():
    assert relative_links("see [a](docs/nope.md#x), ![b](img.png), [c](https://x.org), [d](#e)") == [
        "docs/nope.md#x",
        "img.png",
    ]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/images/mixing-schedule.png" in relative_links(readme)
    assert (ROOT / "docs/images/mixing-schedule.png").exists()
    shown = {(ROOT / t).resolve().relative_to(ROOT).as_posix() for t in relative_links(readme)}
    assert shown >= SCREENSHOTS, "the README shows every technique's screenshot"
