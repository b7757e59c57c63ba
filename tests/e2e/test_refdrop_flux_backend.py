"""RefDrop on Flux and Chroma through the host's own backend: a tiny Flux (2 double + 2 single blocks) or Chroma built
from the host's own classes on the CPU, sampled through its UnetPatcher and sampling_function
(tests/e2e/refdrop_flux_check.py, run with the host's python), on Forge 2.0 and Forge Neo."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.e2e import forge

CHECK = forge.REPO / "tests" / "e2e" / "refdrop_flux_check.py"


@pytest.fixture(
    scope="module",
    params=[("flux", "float32"), ("flux", "float64"), ("chroma", "float32"), ("chroma", "float64")],
    ids=lambda p: "-".join(p),
)
def result(request):
    paths = forge.forge_paths()
    if paths is None:
        pytest.skip(forge.SKIP_REASON)
    model, dtype = request.param
    if dtype == "float64" and forge.is_neo():
        pytest.skip("Forge Neo's Flux RoPE (comfy_kitchen's apply_rope) has no float64 path: fp32 tolerances only")
    forge_dir, python = paths
    proc = subprocess.run(
        [str(python), str(CHECK), "--model", model, "--dtype", dtype, "--depth", "2"],
        cwd=forge_dir,
        env=forge.offline_env(),
        capture_output=True,
        text=True,
        timeout=2400,  # Neo's tiny Chroma keeps 19 + 38 blocks: ~27 min on a loaded 2-core machine
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"check failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


def test_the_reference_is_tagged_with_family_and_shapes(result):
    assert result["host"] == ("Forge Neo" if forge.is_neo() else "Forge")
    # Neo's tiny Chroma keeps Chroma's 19 + 38 blocks (its modulation table needs them); the others have 2 + 2
    double, single = (19, 38) if result["model"] == "chroma" and forge.is_neo() else (2, 2)
    assert result["blocks"] == [double, single]
    assert result["family"] == result["saved_family"] == f"{result['model']}:{double}+{single}@64"
    names = [f"double:{i}:0" for i in range(double)] + [f"single:{i}:0" for i in range(single)]
    assert result["ref_layers"] == sorted(names)
    assert result["ref_keys"] == 3 * (double + single)  # 3 evaluations × every block
    assert result["ref_kv_shape"] == [1, 16, 64]  # image tokens only (64² → 4×4 patches), heads·head_dim channels


def test_recording_and_c0_leave_the_image_bit_identical(result):
    assert result["record_is_plain"]
    for key in ("same_c0_vs_plain", "other_c0_vs_plain", "batch_c0_vs_plain", "image_c0_vs_plain"):
        assert result[key] == 0.0, key


def test_same_seed_record_then_use_gives_the_plain_image(result):
    tol = 0.0 if result["dtype"] == "float64" else 1e-6
    assert result["same_c07_vs_plain"] <= tol
    assert result["cfg_same_c07_vs_plain"] <= tol  # CFG 3 with the uncond branch recorded and blended


def test_other_references_blend_and_c_sign_matters(result):
    assert result["other_c05_vs_plain"] > 1e-3
    assert result["other_cm03_vs_plain"] > 1e-3
    assert result["other_c05_vs_cm03"] > 1e-3
    assert result["batch_c05_vs_plain"] > 1e-3
    assert result["image_c05_vs_plain"] > 1e-3


def test_layer_selection_reaches_each_block(result):
    for spec in ("double:0", "double:1", "single:0", "single:1"):
        assert result[f"layer_{spec}_vs_plain"] > 1e-4, spec
    assert result["layer_parts_distinct"] > 1e-4
    assert result["singles_vs_all"] > 1e-4


def test_use_at_another_size_runs(result):
    assert result["wide_finite"]
    assert result["wide_vs_plain"] > 1e-3  # a 64² reference blended into a 96×64 generation


def test_uncond_branch_is_blended_only_when_asked(result):
    assert result["cfg_uncond_diff"] == 0.0
    assert result["cfg_cond_diff"] > 1e-3
    assert result["cfg_uncond_asked_diff"] > 1e-3


def test_saved_reference_reloads_identically(result):
    assert result["saved_reload_diff"] == 0.0


def test_errors_name_the_mismatch(result):
    label = result["model"].capitalize()
    assert "recorded on sd15" in result["err_sd_ref"] and f"{label} (" in result["err_sd_ref"]
    assert "Flux (19 double + 38 single blocks, 3072 channels)" in result["err_shape_ref"]
    assert "double" in result["err_layers"] and "single" in result["err_layers"]


def test_redux_and_refdrop_together(result):
    assert result["redux_vs_plain"] > 1e-4
    assert result["redux_refdrop_c0_vs_redux"] == 0.0
    assert result["redux_refdrop_c05_vs_redux"] > 1e-3
    assert result["redux_refdrop_c05_vs_refdrop"] > 1e-4


def test_the_attention_function_is_restored(result):
    assert result["attention_restored"]
    assert not result["cuda_initialized"]


def test_consistent_batch_mode_shares_image_tokens_between_the_batch(result):
    assert result["consistent_c0_vs_plain"] == 0.0 and result["consistent_r0_vs_plain"] == 0.0
    assert min(result["consistent_rows_vs_plain"]) > 1e-4  # every image of the batch changes
    assert result["consistent_again"] == 0.0  # seeded: reproducible
    assert "refdrop.mode='Batch'" in result["err_consistent_batch1"]
