"""RefDrop on Forge Neo's newer DiT families through the host's own backend: for each family a tiny model built from
Neo's own class (tests/e2e/tiny_dits/), sampled through its UnetPatcher and sampling_function on the CPU
(tests/e2e/refdrop_dit_check.py, run with the host's python). Forge 2.0 has none of these families."""

from __future__ import annotations

import json
import subprocess

import pytest

from lib_imgcond.refdrop.families import DIT
from tests.e2e import forge
from tests.e2e.tiny_dit import builders

CHECK = forge.REPO / "tests" / "e2e" / "refdrop_dit_check.py"


@pytest.fixture(scope="module", params=sorted(builders()))
def result(request):
    paths = forge.forge_paths()
    if paths is None:
        pytest.skip(forge.SKIP_REASON)
    if not forge.is_neo():
        pytest.skip(f"Forge 2.0 has no {request.param} backend: the family exists on Forge Neo only")
    forge_dir, python = paths
    proc = subprocess.run(
        [str(python), str(CHECK), "--family", request.param],
        cwd=forge_dir, env=forge.offline_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"check failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


def test_the_plain_image_is_real(result):
    assert (
        result["plain_finite"] and result["plain_std"] > 0.1
    )  # not NaN, not constant: the identities below mean something


def test_the_image_tokens_are_where_the_host_puts_them(result):
    if not result["span_checked"]:
        pytest.skip(f"{result['family_key']}: the image tokens are the whole attention call (no span to find)")
    for size, (ours, hosts) in result["spans"].items():
        assert ours == hosts, size


def test_the_reference_is_tagged_and_holds_image_tokens_of_every_block(result):
    family = result["family"]
    assert family.startswith(result["family_key"] + ":") and result["saved_family"] == family
    blocks = len(result["ref_layers"])
    assert blocks >= 2 and result["ref_keys"] == 3 * blocks  # 3 evaluations × every block
    assert result["ref_kv_shape"][:2] == [1, 16]  # image tokens only: 64² → 4×4 patches, no text, no padding


def test_recording_and_c0_leave_the_image_bit_identical(result):
    for key in ("record_vs_plain", "same_c0_vs_plain", "other_c0_vs_plain", "batch_c0_vs_plain", "image_c0_vs_plain",
                "consistent_c0_vs_plain"):  # fmt: skip
        assert result[key] == 0.0, key


def test_same_seed_record_then_use_gives_the_plain_image(result):
    assert result["same_c07_vs_plain"] <= 1e-6
    assert result["cfg_same_c07_vs_plain"] <= 1e-6  # CFG 3 with the uncond branch recorded and blended


def test_other_references_blend_and_c_sign_matters(result):
    for key in ("other_c05_vs_plain", "other_cm03_vs_plain", "other_c05_vs_cm03", "batch_c05_vs_plain",
                "image_c05_vs_plain", "wide_vs_plain"):  # fmt: skip
        assert result[key] > 1e-3, key
    assert min(result["consistent_rows_vs_plain"]) > 1e-3
    assert result["wide_finite"]


def test_every_block_matters(result):
    assert all(d > 1e-4 for d in result["layer_vs_plain"].values()), result["layer_vs_plain"]
    assert result["layers_distinct"] > 1e-4


def test_the_uncond_branch_is_untouched_unless_asked(result):
    assert result["cfg_uncond_diff"] == 0.0
    assert result["cfg_cond_diff"] > 1e-3 and result["cfg_uncond_asked_diff"] > 1e-3


def test_the_reload_of_a_saved_reference_blends_the_same(result):
    assert result["saved_reload_diff"] == 0.0


def test_references_of_other_families_are_clear_errors(result):
    label = result["family_key"]
    assert "recorded on sd15" in result["err_sd_ref"] and "the loaded model is" in result["err_sd_ref"]
    assert "Flux (19 double + 38 single" in result["err_flux_ref"]
    assert "valid indices on" in result["err_layers"], label


def test_the_host_is_left_as_it_was(result):
    assert result["functions_restored"]  # the attention functions are the host's own objects again
    assert result["hooks_left"] == 0


def test_an_edit_models_reference_latents_stay_context(result):
    if not result["edit_checked"]:
        pytest.skip(f"{result['family_key']}: no edit reference latents in this family's model calls")
    ours, hosts = result["edit_spans"]
    assert ours == hosts and hosts[1] - hosts[0] == 16  # the generated image's 4×4 tokens, not the reference's 6×4
    assert result["edit_plain_vs_plain"] > 1e-3  # the reference latents reach the model
    assert result["edit_ref_kv_shape"][:2] == [1, 16]  # recorded: the generated image's tokens only
    assert result["edit_same_c07_vs_plain"] <= 1e-6
    assert result["edit_c05_vs_plain"] > 1e-3
    # the first block's attention: the generated image's outputs blended, the reference latents' and text's plain
    assert result["edit_image_rows_diff"] > 1e-4 and result["edit_other_rows"] == 24 + 11
    assert result["edit_other_rows_diff"] == 0.0


def test_a_latent_of_several_frames_is_a_clear_error(result):
    if "err_frames" not in result:
        pytest.skip(f"{result['builder']}: no frame count is refused")
    message = result["err_frames"]
    assert message and "RefDrop" in message and "frames" in message, message
    assert DIT[result["family_key"]].label in message, message  # names the family


def test_tokens_the_host_adds_beside_the_image_are_context(result):
    extra = result.get("extra")
    if extra is None:
        pytest.skip(f"{result['family_key']}: the tiny model has no host state that adds tokens beside the image")
    assert extra["ref_kv_shape"][:2] == [1, 16] and extra["call_tokens"] > 16  # the call holds more; the image only
    assert extra["plain_vs_without"] > 1e-3  # the added tokens reach the image
    assert extra["record_vs_plain"] == 0.0 and extra["same_c07_vs_plain"] <= 1e-6
    assert extra["other_c05_vs_plain"] > 1e-3


def test_a_video_clip_blends_every_frame(result):
    clip = result.get("clip")
    if clip is None:
        pytest.skip(f"{result['family_key']}: an image family")
    assert clip["plain_finite"] and clip["plain_std"] > 0.1
    ours, hosts = clip["span"]
    assert ours == hosts and ours == [0, clip["ref_kv_shape"][1]]  # every frame's tokens, recorded
    frames = clip["frames"]
    assert frames >= 2 and clip["ref_kv_shape"][:2] == [1, 16 * frames]  # 64² → 4×4 patches per frame
    assert clip["recorded_bytes"] == clip["estimate"] == frames * clip["estimate_one_frame"]  # the RAM estimate
    for key in ("record_vs_plain", "other_c0_vs_plain"):
        assert clip[key] == 0.0, key
    assert clip["same_c07_vs_plain"] <= 1e-6 and clip["cfg_same_c07_vs_plain"] <= 1e-6
    assert clip["other_c05_vs_plain"] > 1e-3


def test_an_images_reference_runs_as_a_still_clip(result):
    clip = result.get("clip")
    if clip is None:
        pytest.skip(f"{result['family_key']}: an image family")
    assert clip["image_c0_vs_plain"] == 0.0 and clip["image_c05_vs_plain"] > 1e-3
    assert len(clip["image_inputs"]) == 6  # 3 steps × (the reference's forward, the clip's)
    assert all(shape[2] == clip["frames"] for shape in clip["image_inputs"])


def test_a_reference_of_another_frame_count_blends(result):
    clip = result.get("clip")
    if clip is None:
        pytest.skip(f"{result['family_key']}: an image family")
    assert clip["fewer_frames_finite"] and clip["fewer_frames_vs_plain"] > 1e-3  # a longer clip's into a shorter
    assert clip["one_frame_ref_finite"] and clip["one_frame_ref_vs_plain"] > 1e-3  # an image's into a clip


def test_what_a_clip_cannot_do_is_refused(result):
    clip = result.get("clip")
    if clip is None:
        pytest.skip(f"{result['family_key']}: an image family")
    assert "batch size 1" in clip["err_batch_item"] and "one clip" in clip["err_batch_item"]
    assert "mode Batch" in clip["err_batch_mode"] and "one clip" in clip["err_batch_mode"]
