"""RefDrop's RAM estimate counts model evaluations the way the host's sampler configuration does, not by name.

A fake `modules.sd_samplers` holds SamplerData entries shaped like Forge's (name, constructor, aliases, options,
total_steps doubling the steps of samplers whose options say second_order) for the samplers that matter here.
"""

from __future__ import annotations

import sys
import types
from collections import namedtuple

import pytest

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host import samplers
from lib_imgcond.refdrop import forge_library
from lib_imgcond.refdrop import forge_refdrop as host
from lib_imgcond.refdrop import layers as rd
from lib_imgcond.refdrop.checks import estimate_bytes
from lib_imgcond.refdrop.reference import Reference
from tests.glue.fakes import fake_p
from tests.glue.test_refdrop_glue import VALUES


class SamplerData(namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])):
    def total_steps(self, steps):
        return steps * 2 if self.options.get("second_order", False) else steps


# label → (aliases, whether Forge's table marks it second order)
TABLE = {
    "Euler": (["k_euler"], False),
    "Heun": (["k_heun"], True),
    "DPM++ 2M SDE": (["k_dpmpp_2m_sde"], False),
    "DPM++ 2M SDE Heun": (["k_dpmpp_2m_sde_heun"], False),
    "DPM++ 3M SDE": (["k_dpmpp_3m_sde"], False),
    "DPM++ SDE": (["k_dpmpp_sde"], True),
    "DPM2 a": (["k_dpm_2_a"], True),
    "Restart": (["restart"], True),
}


@pytest.fixture
def host_samplers(monkeypatch):
    mod = types.ModuleType("modules.sd_samplers")
    data = [SamplerData(name, None, aliases, {"second_order": so}) for name, (aliases, so) in TABLE.items()]
    mod.all_samplers_map = {x.name: x for x in data}
    mod.samplers_map = {a.lower(): x.name for x in data for a in [x.name, *x.aliases]}
    pkg = types.ModuleType("modules")
    pkg.sd_samplers = mod
    monkeypatch.setitem(sys.modules, "modules", pkg)
    monkeypatch.setitem(sys.modules, "modules.sd_samplers", mod)
    return mod


STEPS = 20
LAYERS = frozenset(tuple(x[:3]) for x in rd.layer_table("sd15"))


def per_evaluation() -> int:
    return estimate_bytes([rd.layer_shape("sd15", x, 64, 64) for x in LAYERS], 1, 1, 4)


def record_p(sampler: str, **kw):
    return fake_p("sd15", width=64, height=64, steps=STEPS, sampler_name=sampler, batch_size=1, **kw)


@pytest.mark.parametrize(
    ("sampler", "evals"),
    [
        ("Euler", STEPS),
        ("DPM++ 2M SDE", STEPS),  # "SDE" in the name, first order for the host
        ("DPM++ 2M SDE Heun", STEPS),
        ("DPM++ 3M SDE", STEPS),
        ("Heun", 2 * STEPS),
        ("DPM++ SDE", 2 * STEPS),
        ("DPM2 a", 2 * STEPS),
        ("Restart", 2 * STEPS),  # the host's count (the old name guess said 4 per step)
        ("k_dpmpp_2m_sde", STEPS),  # an alias
        ("k_heun", 2 * STEPS),
    ],
)
def test_estimate_counts_the_hosts_evaluations(host_samplers, sampler, evals):
    assert samplers.evaluations(sampler, STEPS) == evals
    needed = host._estimate(record_p(sampler), "sd15", LAYERS, False, 1, 4)
    assert needed == evals * per_evaluation()


@pytest.mark.parametrize("sampler", ["DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"])
def test_first_order_sde_recordings_that_fit_are_not_refused(host_samplers, sampler):
    budget = int(1.5 * STEPS * per_evaluation())  # fits one evaluation per step, not two
    job = host.plan(record_p(sampler), dict(VALUES, mode="Record"), budget, False)
    assert job.record is not None
    with pytest.raises(ImgcondError, match="RAM budget"):
        host.plan(record_p("Heun"), dict(VALUES, mode="Record"), budget, False)


def test_without_the_hosts_word_one_evaluation_per_step(host_samplers, monkeypatch):
    assert samplers.evaluations("Some Extension Sampler", STEPS) == STEPS  # not in the host's table
    monkeypatch.delitem(sys.modules, "modules.sd_samplers")
    monkeypatch.setitem(sys.modules, "modules", types.ModuleType("modules"))
    assert samplers.evaluations("Heun 2 SDE", STEPS) == STEPS  # no WebUI: no guessing from the name


def test_the_sampler_objects_own_config_wins(host_samplers):
    heun = host_samplers.all_samplers_map["Heun"]
    assert samplers.evaluations("Euler", STEPS, sampler=types.SimpleNamespace(config=heun)) == 2 * STEPS


def test_hires_pass_uses_its_own_sampler_or_the_first_ones(host_samplers):
    p = record_p("DPM++ 2M SDE", enable_hr=True, hr_second_pass_steps=10, hr_sampler_name="Heun")
    p.hr_upscale_to_x, p.hr_upscale_to_y = 128, 128
    first = STEPS * per_evaluation()
    hires = estimate_bytes([rd.layer_shape("sd15", x, 128, 128) for x in LAYERS], 1, 1, 4)
    assert host._estimate(p, "sd15", LAYERS, True, 1, 4) == first + 2 * 10 * hires
    p.hr_sampler_name = "Use same sampler"
    assert host._estimate(p, "sd15", LAYERS, True, 1, 4) == first + 10 * hires


def test_the_docs_reference_listing_names_the_fields_the_api_returns(monkeypatch, tmp_path):
    import re

    from lib_imgcond.spec.api_docs import doc_path

    monkeypatch.setattr(host.library, "references_dir", lambda: str(tmp_path))
    ref = Reference("hero", "sd15", {"width": 64, "height": 64, "steps": {"first": 3}, "layers": []})
    monkeypatch.setitem(forge_library.REFERENCES, "hero", ref)
    (entry,) = forge_library.describe()
    text = doc_path("refdrop").read_text(encoding="utf-8")
    listing = re.search(r"`GET /imgcond/v1/refdrop/references` lists references, each with (.*?);\n", text, re.S)
    assert listing, "docs/refdrop.md's reference listing sentence moved"
    names = re.findall(r"`(\w+)`", listing.group(1))
    assert len(names) == len(set(names)), "a field is named twice"
    assert set(names) == set(entry)
