"""The family × technique table (README.md) and its details (docs/compatibility.md) agree with the code: the blocks are
current, every family a technique serves (its own FAMILIES) names a test that exists, every family it refuses has a
reason, and each technique's refusal at run time names the family and gives that reason."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.flexdiffuse.spec import SPEC as FLEX
from lib_imgcond.host.forge import ENGINE_FAMILIES, FAMILY_LABELS
from lib_imgcond.mixing import forge_mixing
from lib_imgcond.redux.spec import SPEC as REDUX
from lib_imgcond.refdrop.families import DIT
from lib_imgcond.refdrop.spec import SPEC as REFDROP
from lib_imgcond.spec import api_docs, family_docs, forge_families
from lib_imgcond.spec import families as fam
from lib_imgcond.style.spec import SPEC as STYLE
from lib_imgcond.unclip.spec import SPEC as UNCLIP

ROOT = fam.ROOT
ENGINE = {family: engine for engine, family in ENGINE_FAMILIES.items()}
LOADED = [f for f in FAMILY_LABELS if f in fam.loaded()]


def test_the_generated_blocks_are_current():
    assert forge_families.main([]) == 0, "run python -m lib_imgcond.spec.forge_families --write"
    for block, rel in family_docs.PAGES.items():
        text = (ROOT / rel).read_text(encoding="utf-8")
        assert family_docs.render(text, block, forge_families.served(), FAMILY_LABELS) == text, rel


def test_every_family_a_host_loads_is_a_known_family_and_every_known_family_is_loaded():
    assert set(fam.loaded()) <= set(FAMILY_LABELS)
    assert set(FAMILY_LABELS) - {"other"} == set(fam.loaded())
    assert set(fam.TECHNIQUES) == {spec.prefix for spec in api_docs.SPECS} == set(forge_families.MODULES)


def table_rows() -> dict[str, list[str]]:
    """The README table read back without the generator: family label -> its cells."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- families:table -->\n(.*?)\n<!-- /families:table -->", text, re.S).group(1)
    lines = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| family")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_the_readme_table_says_what_the_code_does():
    rows = table_rows()
    assert list(rows) == [FAMILY_LABELS[f] for f in LOADED]
    hosts, techniques = list(fam.HOSTS), list(fam.TECHNIQUES)
    for family in LOADED:
        cells = rows[FAMILY_LABELS[family]]
        assert len(cells) == len(hosts) + len(techniques)
        for host, cell in zip(hosts, cells, strict=False):
            assert (cell == family_docs.YES) == (family in fam.HOSTS[host]), (family, host)
        for key, cell in zip(techniques, cells[len(hosts) :], strict=True):
            served = family in forge_families.MODULES[key].FAMILIES
            assert (cell in fam.KINDS) == served and (cell == family_docs.NO) == (not served), (key, family, cell)
            if served:
                assert cell == fam.TECHNIQUES[key].test(family).kind


def test_served_cells_name_existing_tests_and_refused_cells_a_reason():
    grid = fam.cells(forge_families.served(), LOADED)
    for (key, family), cell in grid.items():
        if cell.served:
            assert cell.tested.path.is_file(), (key, family)
            if cell.tested.function:
                assert f"def {cell.tested.function}(" in cell.tested.path.read_text(encoding="utf-8")
        else:
            assert len(cell.reason) > 20, (key, family)
    details = (ROOT / "docs/compatibility.md").read_text(encoding="utf-8")
    for cell in grid.values():
        assert cell.served or f": {cell.reason}." in details


def test_refdrops_dit_families_come_from_its_own_registry():
    served = forge_families.served()["refdrop"]
    assert set(DIT) <= set(served)
    for family in DIT:
        assert fam.REFDROP.test(family) is not None


def test_hires_mixing_serves_every_loaded_family_but_pid():
    assert set(forge_mixing.FAMILIES) == set(fam.loaded()) - {"pid"}


# --- drift: a change on one side only is an error --------------------------------------------------------------------
def test_a_family_served_without_a_test_is_an_error(monkeypatch):
    served = {**forge_families.served(), "style_model": ("sd15", "sdxl")}
    with pytest.raises(ValueError, match="style_model serves sdxl without a test reference"):
        fam.check(served)
    monkeypatch.setattr(forge_mixing, "FAMILIES", (*forge_mixing.FAMILIES, "pid"))
    with pytest.raises(ValueError, match="hrmix serves pid but gives a reason for refusing it"):
        fam.check(forge_families.served())
    with pytest.raises(ValueError, match=re.escape("README.md: the family table disagrees")):
        forge_families.main([])


def test_a_refused_family_with_a_test_entry_is_an_error():
    served = {**forge_families.served(), "unclip": ()}
    with pytest.raises(ValueError, match=r"unclip refuses sd2 but names a test for it \(tests/e2e/test_unclip.py\)"):
        fam.check(served)


def test_a_missing_test_file_or_function_is_an_error(monkeypatch):
    monkeypatch.setitem(fam.STYLE.tests, "sd15", fam.Tested("tests/e2e/test_nope.py", "e2e"))
    with pytest.raises(ValueError, match=re.escape("the test tests/e2e/test_nope.py does not exist")):
        fam.check(forge_families.served())
    monkeypatch.setitem(fam.STYLE.tests, "sd15", fam.Tested("tests/e2e/test_style_model.py::test_nope", "e2e"))
    with pytest.raises(ValueError, match=re.escape("test_style_model.py has no test test_nope")):
        fam.check(forge_families.served())


def test_a_served_family_changes_the_rendered_table(monkeypatch):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    monkeypatch.setattr(forge_mixing, "FAMILIES", tuple(f for f in forge_mixing.FAMILIES if f != "sd2"))
    fresh = family_docs.render(text, "table", forge_families.served(), FAMILY_LABELS)
    assert fresh != text
    assert forge_families.main([]) == 1  # the check command sees the stale pages
    sd2 = next(line for line in fresh.splitlines() if line.startswith("| SD2.x |"))
    assert sd2.split("|")[3 + list(fam.TECHNIQUES).index("hrmix")].strip() == family_docs.NO


# --- the run-time refusals give the table's reasons -------------------------------------------------------------------
def _engine(family: str):
    return type(ENGINE[family], (), {})()


def _refuse(key: str, family: str) -> str:
    """Run the technique's own first step (plan / check) on a `family` model; the error it raises."""
    from lib_imgcond.flexdiffuse import forge_flexdiffuse
    from lib_imgcond.redux import forge_redux
    from lib_imgcond.refdrop import forge_refdrop
    from lib_imgcond.style import forge_style
    from lib_imgcond.unclip import forge_unclip

    p = SimpleNamespace(sd_model=_engine(family) if family != "other" else object(), batch_size=1, enable_hr=False)
    steps = {
        "refdrop": lambda: forge_refdrop.plan(p, REFDROP.parse([{"mode": "Use", "reference": "x"}]), 0),
        "redux": lambda: forge_redux.plan(p, REDUX.parse([{}])),
        "hrmix": lambda: forge_mixing.check_model(p),
        "flexdiffuse": lambda: forge_flexdiffuse.plan(p, FLEX.parse([{}]), []),
        "style_model": lambda: forge_style.plan(p, STYLE.parse([{}])),
        "unclip": lambda: forge_unclip.plan(p, UNCLIP.parse([{}])),
    }
    with pytest.raises(ImgcondError) as e:
        steps[key]()
    return str(e.value)


REFUSED = [
    (key, family)
    for key in fam.TECHNIQUES
    for family in [*LOADED, "other"]
    if family not in forge_families.MODULES[key].FAMILIES
]


@pytest.mark.parametrize(("key", "family"), REFUSED, ids=[f"{k}-{f}" for k, f in REFUSED])
def test_a_refusal_names_the_family_and_gives_the_tables_reason(key, family):
    message = _refuse(key, family)
    technique = fam.TECHNIQUES[key]
    title = {s.prefix: s.title for s in api_docs.SPECS}[key].removesuffix(" control")  # Redux's errors say "Redux"
    assert message.startswith(f"{title} needs "), message
    assert f"the loaded checkpoint is {FAMILY_LABELS[family]}: {technique.reason(family)}." in message


def test_an_sd2_checkpoint_without_an_unclip_input_is_refused_with_that_reason():
    message = _refuse("unclip", "sd2")
    assert "the loaded checkpoint is SD2.x: its UNet has no unCLIP image input (`label_emb`)." in message
