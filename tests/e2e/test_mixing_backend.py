"""Hires iterative mixing through each host's own backend, on every family it serves that the host loads: a tiny model
of the family built from the host's class (tests/e2e/tiny_dits/ for Neo's DiTs, tests/e2e/tiny_models.py for the
others), the family's predictor as the host's engine builds it, and the host's k-diffusion samplers driving the
pass with the mixing wrapper installed (tests/e2e/mixing_backend_check.py, run with the host's python).

Parametrised over every family hires mixing serves and every tiny builder found, so a new builder is picked up: a
served family the host loads but no builder covers yet is skipped with that reason; a family with a builder that
mixing refuses must be refused with its reason."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import pytest

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host.forge import ENGINE_FAMILIES, FAMILY_LABELS
from lib_imgcond.mixing import forge_mixing
from lib_imgcond.spec.families import HOSTS, HRMIX
from tests.e2e import forge, tiny_models
from tests.e2e.tiny_dit import builders

CHECK = forge.REPO / "tests" / "e2e" / "mixing_backend_check.py"
BUILT = {*tiny_models.BUILDERS, *builders()}  # builder names: family keys, or variants of a family ('krea2_refs')
ENGINE = {family: engine for engine, family in ENGINE_FAMILIES.items()}
LOADED = {f for families in HOSTS.values() for f in families}


@pytest.fixture(scope="module", params=sorted(set(forge_mixing.FAMILIES) | BUILT))
def result(request):
    name = request.param
    paths = forge.forge_paths()
    if paths is None:
        pytest.skip(forge.SKIP_REASON)
    host = "Forge Neo" if forge.is_neo() else "Forge 2.0"
    if name in LOADED and name not in HOSTS[host]:
        pytest.skip(f"{host} does not load {name}")
    if name not in BUILT:
        pytest.skip(f"no tiny {name} model yet (tests/e2e/tiny_dits/ or tests/e2e/tiny_models.py)")
    forge_dir, python = paths
    proc = subprocess.run(
        [str(python), str(CHECK), "--model", name],
        cwd=forge_dir, env=forge.offline_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"check failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    out = json.loads(lines[-1][len("RESULT ") :])
    if "unavailable" in out:
        pytest.skip(f"{host} has no class for the tiny model {name}: {out['unavailable']}")
    family = out["family"]
    assert family == name or name not in LOADED  # a builder named as a family builds that family
    if "refused" in out:  # a tiny model of a family mixing refuses: refused, with the table's reason
        assert f"the loaded checkpoint is {FAMILY_LABELS[family]}: {HRMIX.reason(family)}" in out["refused"]
        pytest.skip(f"hires mixing refuses {family} ({name}), with its reason")
    return out


def runs(result):
    return result["runs"].items()


def test_the_plain_hires_pass_is_real(result):
    for name, run in runs(result):
        assert run["plain_finite"] and run["plain_std"] > 0.1, name  # not NaN, not constant


def test_the_mixer_reproduces_the_hosts_noise_schedule(result):
    """z'_i equals the host predictor's own noise_scaling(σ_i, ε, z_up) at every step, in the family's formula; with
    w = 1 at step 0 the mixed start is exactly the host's noised start."""
    assert result["runs"]["sample_euler"]["flow"] == (result["prediction_type"] == "const")
    for name, run in runs(result):
        assert run["zprime_vs_host"] <= 1e-6, name
        assert run["w0"] == 1.0 and run["first_input_vs_plain"] <= 1e-6, name


def test_every_step_is_mixed_once(result):
    for name, run in runs(result):
        assert run["steps"] == len(run["sigmas"]) - 1 >= 4, name
        assert run["handled"] == list(range(run["steps"])) and run["mixed"] == run["handled"], name


def test_blend_max_zero_is_the_plain_pass_bit_for_bit(result):
    for name, run in runs(result):
        assert run["zero_vs_plain"] == 0.0 and run["zero_mixed"] == 0, name


def test_mixing_changes_the_pass_and_stays_finite(result):
    for name, run in runs(result):
        assert run["on_finite"] and run["on_vs_plain"] > 1e-2, name
    assert result["rewind_rounds"] >= 2 and result["rewind_finite"] and result["rewind_vs_plain"] > 1e-2


def test_a_batch_mixes_each_image_with_its_own_latent(result):
    assert result["batch_finite"] and result["batch_rows_differ"] > 1e-2
    assert result["batch_row_vs_single"] <= 1e-4


def test_nothing_is_left_behind(result):
    for name, run in runs(result):
        assert run["again_vs_plain"] == 0.0, name  # a plain pass after a mixed one is the plain pass
    assert result["functions_restored"]  # k-diffusion's functions are the host's own objects
    assert result["model_options_unchanged"]  # the patcher is not touched


@pytest.mark.parametrize("family", sorted(LOADED - set(forge_mixing.FAMILIES)))
def test_a_refused_family_is_refused_with_its_reason(family):
    p = SimpleNamespace(sd_model=type(ENGINE[family], (), {})())
    with pytest.raises(ImgcondError) as e:
        forge_mixing.check_model(p)
    message = str(e.value)
    assert f"the loaded checkpoint is {FAMILY_LABELS[family]}: {HRMIX.reason(family)}" in message
