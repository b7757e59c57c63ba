"""Redux glue through the host's own Flux backend: a tiny Flux (IntegratedFluxTransformer2DModel) or Chroma
(IntegratedChromaTransformer2DModel) built from the host's classes on the CPU, sampled through its UnetPatcher and
sampling_function (tests/e2e/flux_backend_check.py, run with the host's python), on Forge 2.0 and Forge Neo."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.e2e import forge

CHECK = forge.REPO / "tests" / "e2e" / "flux_backend_check.py"


def _run(model: str, dtype: str) -> dict:
    paths = forge.forge_paths()
    if paths is None:
        pytest.skip(forge.SKIP_REASON)
    forge_dir, python = paths
    proc = subprocess.run(
        [str(python), str(CHECK), "--model", model, "--dtype", dtype],
        cwd=forge_dir,
        env=forge.offline_env(),
        capture_output=True,
        text=True,
        timeout=2400,  # Neo's tiny Chroma keeps 19 + 38 blocks
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0 and lines, f"check failed ({proc.returncode}):\n{tail}"
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(
    scope="module",
    params=[("flux", "float32"), ("flux", "float64"), ("chroma", "float32"), ("chroma", "float64")],
    ids=lambda p: "-".join(p),
)
def result(request):
    model, dtype = request.param
    if dtype == "float64" and forge.is_neo():
        pytest.skip("Forge Neo's Flux RoPE (comfy_kitchen's apply_rope) has no float64 path: fp32 tolerances only")
    out = _run(model, dtype)
    assert out["model"] == model
    return out


def tol(result, fp32: float) -> float:
    """fp64 must be exact; fp32 allows float reduction-order residue (CFG amplifies it)."""
    return 0.0 if result["dtype"] == "float64" else fp32


def test_the_host_is_probed_as_what_it_is(result):
    assert result["host"] == ("Forge Neo" if forge.is_neo() else "Forge")
    # Forge 2.0's Chroma blocks call its own module's `attention`; Neo's Chroma reuses Flux's blocks (never swapped)
    swapped = "backend.nn.chroma" if result["model"] == "chroma" and not forge.is_neo() else "backend.nn.flux"
    assert result["swap_module"] == swapped


def test_context_grows_by_the_token_count(result):
    assert result["tokens_medium"] == 81
    assert result["ctx_off"] == [256] and result["ctx_medium"] == [256 + 81]
    assert result["medium_vs_off"] > 1e-3
    assert result["ctx_two"] == 256 + 81 + 25  # image 1 (medium) then image 2 (lowest), in order
    assert result["two_order_ok"]


def test_batch_rows_keep_their_own_prompt(result):
    assert result["batch_rows_ok"]


def test_attention_bias_strength_zero_equals_redux_off(result):
    assert result["bias0_patched_calls"] == 3 and result["bias0_ctx"] == [337, 337, 337]
    # Neo: through its dit block replaces, no module function swapped; Forge 2.0: the swap, during each call
    assert result["bias0_swapped_calls"] == (0 if forge.is_neo() else 3)
    assert result["bias0_vs_off"] <= tol(result, 1e-5)
    assert result["mixed_bias0_vs_image1"] <= tol(result, 1e-5)
    assert result["cfg_bias0_vs_off"] <= tol(result, 2e-5)


def test_attention_bias_strength_one_equals_multiply(result):
    assert result["bias1_vs_multiply1"] == 0.0 and result["bias1_patched_calls"] == 0
    assert result["bias1_forced_vs_multiply1"] <= tol(result, 1e-5)  # the SDPA path itself, forced on
    assert result["bias_half_vs_off"] > 1e-3 and result["bias_half_vs_full"] > 1e-3


def test_cfg_keeps_the_uncond_prediction(result):
    for name, n in (("medium", 81), ("n256", 256)):  # 256: Forge would repeat uncond 256 → 512
        assert result[f"cfg_{name}_tokens"] == n
        assert result[f"cfg_{name}_ctx"] == [256, 256 + n]  # cond and uncond in separate calls
        assert result[f"cfg_{name}_uncond_diff"] <= tol(result, 1e-5)
        assert result[f"cfg_{name}_cond_diff"] > 1e-3
    assert result["cfg_bias_uncond_diff"] <= tol(result, 1e-5)


def test_step_window(result):
    assert result["window_inactive_vs_off"] == 0.0
    assert result["window_active_vs_off"] > 1e-3


def test_attention_restored_and_no_cuda(result):
    assert result["attention_restored"] is True
    assert result["cuda_initialized"] is False


def test_clear_errors(result):
    e = result["errors"]
    assert "Redux image 1: the mask is empty" in e["empty_mask"]
    assert "Redux image 1: the mask is 40×40 pixels but the image is 96×64" in e["mask_size"]
    assert "Redux SigLIP vision model" in e["wrong_siglip"] and "Redux style model" in e["wrong_siglip"]
    assert "looks like clip-vit" in e["clip_as_siglip"] and "SigLIP so400m" in e["clip_as_siglip"]
    assert "expected the Flux Redux style model" in e["redux_as_siglip_slot"]
    assert "'nope.safetensors' was not found in" in e["missing"] and "imgcond/redux" in e["missing"]


def test_encoders_inside_the_hosts_model_management(result):
    managed = result["managed"]
    assert managed["capability"] and managed["full_load_flag"] == forge.is_neo()
    assert managed["patchers"] == ["backend.patcher.base.ModelPatcher"] * 2
    assert managed["loaded"] == [True, True]  # the host loaded them (load_models_gpu), we moved nothing ourselves
