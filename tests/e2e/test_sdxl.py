"""The SDXL random checkpoint through the extension (needs IMGCOND_E2E_SDXL=1: about 19 GB of RAM)."""

from __future__ import annotations

import pytest

from tests.e2e import forge

pytestmark = pytest.mark.sdxl


def test_sdxl_refdrop_record_use(sdxl_server):
    body = forge.payload(seed=1, steps=2)
    plain = sdxl_server.generate(body)
    rec = sdxl_server.generate(forge.with_script(body, "refdrop", [{"mode": "Record", "reference": "xl"}]))
    assert forge.max_diff(rec.image, plain.image) == 0
    refs = {r["name"]: r for r in sdxl_server.get("/imgcond/v1/refdrop/references")}
    assert refs["xl"]["family"] == "sdxl" and len(refs["xl"]["layers"]) == 70
    same = sdxl_server.generate(
        forge.with_script(body, "refdrop", [{"mode": "Use", "reference": "xl", "coefficient": 0.7}])
    )
    assert forge.max_diff(same.image, plain.image) == 0
    other = forge.payload(seed=2, steps=2)
    plain2 = sdxl_server.generate(other)
    used = sdxl_server.generate(
        forge.with_script(other, "refdrop", [{"mode": "Use", "reference": "xl", "coefficient": 0.5}])
    )
    assert forge.max_diff(used.image, plain2.image) > 0
    assert forge.max_diff(sdxl_server.generate(other).image, plain2.image) == 0
