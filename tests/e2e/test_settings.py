"""Extension-wide settings through /sdapi/v1/options on an API-only (--nowebui) server, as the harness starts it:
listed with their defaults, set through the API, and in effect for the next generation."""

from __future__ import annotations

from tests.e2e import forge

DEFAULTS = {
    "imgcond_refdrop_ram_budget_gb": 16.0,
    "imgcond_refdrop_gpu_share": 25.0,
    "imgcond_refdrop_storage_precision": "as computed",
    "imgcond_flexdiffuse_extra_dir": "",
    "imgcond_redux_extra_dirs": "",
}


def record(name: str) -> dict:
    return forge.with_script(forge.payload(seed=11), "refdrop", [{"mode": "Record", "reference": name}])


def test_settings_are_listed_set_and_used_on_an_api_only_server(server):
    options = server.get("/sdapi/v1/options")
    assert {k: options.get(k) for k in DEFAULTS} == DEFAULTS
    status, _ = server.post("/sdapi/v1/options", {"imgcond_refdrop_ram_budget_gb": 0.0001})
    assert status == 200
    try:
        assert server.get("/sdapi/v1/options")["imgcond_refdrop_ram_budget_gb"] == 0.0001
        err = server.generate_error(record("over-budget"))
        assert "the RAM budget is" in err, err
        assert "over-budget" not in {r["name"] for r in server.get("/imgcond/v1/refdrop/references")}
    finally:
        status, _ = server.post("/sdapi/v1/options", {"imgcond_refdrop_ram_budget_gb": 16.0})
        assert status == 200
    server.generate(record("within-budget"))  # the restored budget holds it
    server.delete("/imgcond/v1/refdrop/references/within-budget")
