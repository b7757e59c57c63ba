"""Host memory comes back: repeated RefDrop record/delete cycles plateau instead of growing."""

from __future__ import annotations

import json

from tests.e2e import forge, webui

CYCLES = 6
# Each 20-step 128² SD1.5 reference is ~110 MiB. After the first cycle (allocator warm-up, one-time imports) the RSS
# may move by less than one reference over the remaining cycles; a leak of one reference per cycle would add ~550 MiB.
PLATEAU_MIB = 110


def _cycle(server, i: int) -> None:
    body = forge.payload(seed=10 + i, steps=20, width=128, height=128)
    server.generate(forge.with_script(body, "refdrop", [{"mode": "Record", "reference": "mem"}]))
    assert server.delete("/imgcond/v1/refdrop/references/mem")["deleted"]


def test_record_delete_cycles_plateau(server):
    _cycle(server, 0)
    after_first = webui.rss_mib(server)
    readings = []
    for i in range(1, CYCLES):
        _cycle(server, i)
        readings.append(webui.rss_mib(server))
    growth = max(readings) - after_first
    (forge.cache_dir() / "logs").mkdir(exist_ok=True)
    (forge.cache_dir() / "logs" / f"memory-{forge.host_kind()}.json").write_text(
        json.dumps({"after_first_mib": after_first, "after_each_mib": readings, "growth_mib": growth})
    )
    assert growth <= PLATEAU_MIB, f"RSS after each cycle (MiB): {after_first:.0f} then {[round(r) for r in readings]}"
