"""RefDrop against a real headless Forge (random SD1.5 weights, CPU)."""

from __future__ import annotations

import pytest

from tests.e2e import forge

TITLE = "refdrop"


def refdrop(body: dict, **args) -> dict:
    return forge.with_script(body, TITLE, [args])


@pytest.fixture(scope="module")
def plain(server):
    return {seed: server.generate(forge.payload(seed=seed)).image for seed in (1, 2)}


@pytest.fixture(scope="module")
def recorded(server):
    out = server.generate(refdrop(forge.payload(seed=1), mode="Record", reference="cat", save=True))
    assert "refdrop_mode: Record" in out.infotext
    return out


@pytest.fixture(scope="module")
def use_half(server, recorded):
    """Use of "cat" at c = 0.5 on seed 2, made before any test restarts the server."""
    return server.generate(refdrop(forge.payload(seed=2), mode="Use", reference="cat", coefficient=0.5))


def test_record_leaves_the_image_unchanged(recorded, plain):
    assert forge.max_diff(recorded.image, plain[1]) == 0


def test_reference_listed_with_size(server, recorded):
    refs = {r["name"]: r for r in server.get("/imgcond/v1/refdrop/references")}
    assert refs["cat"]["family"] == "sd15" and refs["cat"]["saved"] and refs["cat"]["bytes"] > 0


def test_use_same_seed_reproduces_the_reference(server, recorded, plain):
    out = server.generate(refdrop(forge.payload(seed=1), mode="Use", reference="cat", coefficient=0.7))
    assert forge.max_diff(out.image, plain[1]) == 0


def test_c_zero_is_identical_to_disabled(server, recorded, plain):
    out = server.generate(refdrop(forge.payload(seed=2), mode="Use", reference="cat", coefficient=0.0))
    assert forge.max_diff(out.image, plain[2]) == 0


def test_positive_and_negative_c_change_the_image(server, recorded, plain, use_half):
    pos = use_half
    neg = server.generate(refdrop(forge.payload(seed=2), mode="Use", reference="cat", coefficient=-0.3))
    assert forge.max_diff(pos.image, plain[2]) > 0
    assert forge.max_diff(neg.image, plain[2]) > 0
    assert forge.max_diff(pos.image, neg.image) > 0
    assert "refdrop_coefficient: 0.5" in pos.infotext and "refdrop_reference: cat" in pos.infotext
    again = server.generate(forge.payload(seed=2))
    assert forge.max_diff(again.image, plain[2]) == 0  # no leak into a plain run


def test_positional_args_match_named_args(server, recorded):
    named = server.generate(refdrop(forge.payload(seed=2), mode="Use", reference="cat", coefficient=0.5))
    positional = server.generate(forge.with_script(forge.payload(seed=2), TITLE, [True, "Use", "cat", 0.5]))
    assert forge.max_diff(named.image, positional.image) == 0


def test_layers_window_and_multi_reference(server, recorded, plain, use_half):
    body = refdrop(forge.payload(seed=2), mode="Use", reference="cat", coefficient=0.5, layers="output", start=0.3)
    out = server.generate(body)
    assert forge.max_diff(out.image, plain[2]) > 0
    assert forge.max_diff(out.image, use_half.image) > 0
    server.generate(refdrop(forge.payload(seed=3), mode="Record", reference="dog"))
    multi = server.generate(
        refdrop(forge.payload(seed=2), mode="Use", reference="cat", coefficient=0.3, more_references="dog:-0.2")
    )
    assert forge.max_diff(multi.image, plain[2]) > 0


def test_batch_and_other_step_count(server, recorded):
    out = server.generate(refdrop(forge.payload(seed=2, batch_size=2), mode="Use", reference="cat", coefficient=0.4))
    assert len(out.images) == 2
    out = server.generate(
        refdrop(forge.payload(seed=2, steps=5, width=128), mode="Use", reference="cat", coefficient=0.4)
    )
    assert out.image.shape == (64, 128, 3)  # 128: Forge Neo rounds sizes to multiples of 64


def test_hires_record_and_use(server, plain):
    server.generate(refdrop(forge.payload(seed=4, enable_hr=True), mode="Record", reference="hr", hires=True))
    on = server.generate(refdrop(forge.payload(seed=5, enable_hr=True), mode="Use", reference="hr", hires=True))
    off = server.generate(refdrop(forge.payload(seed=5, enable_hr=True), mode="Use", reference="hr", hires=False))
    assert on.image.shape == off.image.shape == (128, 128, 3)
    assert forge.max_diff(on.image, off.image) > 0
    same = server.generate(refdrop(forge.payload(seed=4, enable_hr=True), mode="Use", reference="hr", hires=True))
    base = server.generate(forge.payload(seed=4, enable_hr=True))
    assert forge.max_diff(same.image, base.image) == 0


def test_clear_errors_before_sampling(server, recorded):
    err = server.generate_error(refdrop(forge.payload(), mode="Use", reference="nope"))
    assert "RefDrop reference 'nope' does not exist" in err
    err = server.generate_error(refdrop(forge.payload(enable_hr=True), mode="Use", reference="cat", hires=True))
    assert "no hires-pass K/V" in err
    err = server.generate_error(refdrop(forge.payload(), mode="Use", reference="cat", coefficient=3))
    assert "refdrop.coefficient=3" in err and "[-1, 1]" in err
    err = server.generate_error(refdrop(forge.payload(), mode="Use", reference="cat", layerz="x"))
    assert "refdrop.layerz" in err


def test_saved_reference_survives_restart(server, recorded, use_half):
    server.restart()
    out = server.generate(refdrop(forge.payload(seed=2), mode="Use", reference="cat", coefficient=0.5))
    assert forge.max_diff(out.image, use_half.image) == 0


def test_image_mode_takes_the_reference_from_an_upload(server, baseline, plain):
    body = refdrop(forge.payload(seed=2), mode="Image", reference="from-image", coefficient=0.5, image=baseline["init"])
    out = server.generate(body)
    assert forge.max_diff(out.image, plain[2]) > 0
    assert "refdrop_mode: Image" in out.infotext and "refdrop_image" not in out.infotext
    zero = server.generate(
        refdrop(forge.payload(seed=2), mode="Image", reference="from-image", coefficient=0.0, image=baseline["init"])
    )
    assert forge.max_diff(zero.image, plain[2]) == 0
    reused = server.generate(refdrop(forge.payload(seed=2), mode="Use", reference="from-image", coefficient=0.5))
    assert forge.max_diff(reused.image, out.image) == 0  # the captured reference is kept for plain Use
    err = server.generate_error(refdrop(forge.payload(), mode="Image", reference="x"))
    assert "refdrop.image" in err


def test_foreign_and_corrupt_reference_files(server, recorded):
    import torch

    from lib_imgcond.refdrop import file_format, reference

    folder = server.data_dir / "models" / "imgcond" / "refdrop"
    folder.mkdir(parents=True, exist_ok=True)
    xl = reference.Reference("xl", "sdxl", {"width": 64, "height": 64, "trace": {"first": [0.0]}})
    xl.put(("first", 0, "middle", 0, 0), torch.zeros(1, 4, 1280), torch.zeros(1, 4, 1280))
    file_format.save_reference(xl, folder / "xl.safetensors")
    err = server.generate_error(refdrop(forge.payload(), mode="Use", reference="xl"))
    assert "recorded on sdxl but the loaded model is sd15" in err
    data = (folder / "cat.safetensors").read_bytes()
    (folder / "broken.safetensors").write_bytes(data[: len(data) // 2])
    err = server.generate_error(refdrop(forge.payload(), mode="Use", reference="broken"))
    assert "truncated or corrupt" in err and "record it again" in err
    after = server.generate(forge.payload(seed=1))
    assert after.images  # the server keeps working after refused jobs


@pytest.mark.parametrize(("sampler", "cfg"), [("Heun", 7), ("DPM++ 2M", 1)])
def test_second_order_sampler_and_cfg1_round_trip(server, sampler, cfg):
    body = forge.payload(seed=6, sampler_name=sampler, cfg_scale=cfg)
    plain = server.generate(body)
    rec = server.generate(refdrop(body, mode="Record", reference=f"r-{sampler}"))
    assert forge.max_diff(rec.image, plain.image) == 0
    same = server.generate(refdrop(body, mode="Use", reference=f"r-{sampler}", coefficient=0.8))
    assert forge.max_diff(same.image, plain.image) == 0
    other = forge.payload(seed=7, sampler_name=sampler, cfg_scale=cfg)
    changed = server.generate(refdrop(other, mode="Use", reference=f"r-{sampler}", coefficient=0.8))
    assert forge.max_diff(changed.image, server.generate(other).image) > 0


def _xyz_args(server, label: str, values: str) -> list:
    """Positional X/Y/Z plot args with `label` on X (found in the API's own choices) and nothing on Y/Z."""
    info = server.get("/sdapi/v1/script-info")
    plot = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    labels = plot["args"][0]["choices"]
    assert label in labels, f"{label!r} is not among the API's X/Y/Z types ({len(labels)} types)"
    args = [labels.index(label), values, [], 0, "", [], 0, "", []]
    args += [False, True, False, False, False, False, False]  # legend, lone images, sub-grids, -1 seeds, vary ×3
    if any(a["label"] == "Row Count" for a in plot["args"]):
        args.append(0)  # Forge Neo's run() takes a row count (0 = auto) before the margin size
    return [*args, 0, False]


def test_xyz_plot_over_the_api_only_server(server, recorded, plain):
    """The axes exist on a --nowebui server; c = 0 cell = plain image, c = 0.5 cell = the same request without the
    plot."""
    body = refdrop(forge.payload(seed=2), mode="Use", reference="cat", coefficient=0.9)
    body.update(script_name="x/y/z plot", script_args=_xyz_args(server, "[RefDrop] RFG coefficient c", "0, 0.5"))
    out = server.generate(body)
    cells = [img for img in out.images if img.shape == plain[2].shape]
    assert len(cells) == 2, [img.shape for img in out.images]
    assert forge.max_diff(cells[0], plain[2]) == 0
    assert forge.max_diff(cells[1], cells[0]) > 0
    direct = server.generate(refdrop(forge.payload(seed=2), mode="Use", reference="cat", coefficient=0.5))
    assert forge.max_diff(cells[1], direct.image) == 0


def test_xyz_bad_axis_value_fails_before_the_grid(server, recorded):
    body = refdrop(forge.payload(seed=2), mode="Use", reference="cat")
    body.update(script_name="x/y/z plot", script_args=_xyz_args(server, "[RefDrop] RFG coefficient c", "0, 1.5"))
    assert "refdrop.coefficient" in server.generate_error(body)


def test_interrupted_record_is_discarded_with_a_notice(server, recorded):
    import threading
    import time

    body = refdrop(forge.payload(seed=3, steps=30), mode="Record", reference="half", save=True)
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=server.generate(body)))
    worker.start()
    time.sleep(4)
    server.post("/sdapi/v1/interrupt", {})
    worker.join(600)
    out = result["out"]
    notices = out.info["extra_generation_params"].get("ImgCond notices") or []
    assert any("recording of 'half' was interrupted" in n and "discarded" in n for n in notices), notices
    names = {r["name"] for r in server.get("/imgcond/v1/refdrop/references")}
    assert "half" not in names and "cat" in names
    assert "does not exist" in server.generate_error(refdrop(forge.payload(), mode="Use", reference="half"))


def test_a_corrupt_file_is_listed_as_broken_and_hides_nothing(server, recorded):
    folder = server.data_dir / "models" / "imgcond" / "refdrop"
    (folder / "bad.safetensors").write_bytes(bytes(range(256)) * 40)
    refs = {r["name"]: r for r in server.get("/imgcond/v1/refdrop/references")}
    assert refs["cat"]["broken"] is None and refs["cat"]["family"] == "sd15"
    assert "truncated or corrupt" in refs["bad"]["broken"]
    err = server.generate_error(refdrop(forge.payload(), mode="Use", reference="bad"))
    assert "bad.safetensors is truncated or corrupt" in err
    assert server.delete("/imgcond/v1/refdrop/references/bad")["deleted"]
    assert "bad" not in {r["name"] for r in server.get("/imgcond/v1/refdrop/references")}


# --- storage precision, step subset, library ------------------------------------------------------------------------
def settings(server, **values) -> None:
    """Write RefDrop settings into the server's config.json (an API-only server registers no settings page, so they
    are read from there); they apply from the next start."""
    import json

    config = server.data_dir / "config.json"
    data = json.loads(config.read_text()) if config.exists() else {}
    for key in ("imgcond_refdrop_storage_precision", "imgcond_refdrop_store_fp16"):
        data.pop(key, None)
    data.update(values)
    config.write_text(json.dumps(data))


def listing(server) -> dict:
    return {r["name"]: r for r in server.get("/imgcond/v1/refdrop/references")}


def test_fp8_record_then_use_differs_from_plain_and_reloads_after_restart(server, recorded, plain):
    settings(server, imgcond_refdrop_storage_precision="fp8")
    server.restart()
    try:
        _fp8_then_the_old_fp16_switch(server, plain)
    finally:  # the later tests of this session's server record at full precision again
        settings(server)
        server.restart()


def _fp8_then_the_old_fp16_switch(server, plain):
    out = server.generate(refdrop(forge.payload(seed=1), mode="Record", reference="cat8", save=True))
    assert forge.max_diff(out.image, plain[1]) == 0  # Record leaves the image alone
    refs = listing(server)
    assert refs["cat8"]["precision"] == "fp8" and refs["cat"]["precision"] == "as computed"
    assert refs["cat8"]["bytes"] < refs["cat"]["bytes"] / 3.9  # fp32 K/V on the CPU: a quarter (+ header, scales)
    use = refdrop(forge.payload(seed=2), mode="Use", reference="cat8", coefficient=0.5)
    before = server.generate(use).image
    assert forge.max_diff(before, plain[2]) > 0
    settings(server, imgcond_refdrop_store_fp16=True)  # the older switch, as a user's config still has it
    server.restart()
    refs = listing(server)
    assert refs["cat8"]["precision"] == "fp8" and not refs["cat8"]["in_ram"] and refs["cat8"]["saved"]
    assert forge.max_diff(server.generate(use).image, before) == 0  # the file kept the fp8 K/V and their scales
    server.generate(refdrop(forge.payload(seed=1), mode="Record", reference="cat16"))
    refs = listing(server)
    assert refs["cat16"]["precision"] == "fp16"  # the file of "cat" holds its header too: about half
    assert abs(refs["cat16"]["bytes"] * 2 / refs["cat"]["bytes"] - 1) < 0.05


def test_record_every_2_is_half_the_size_and_use_runs(server, plain):
    for name, every in (("full4", 1), ("half4", 2)):
        out = server.generate(
            refdrop(forge.payload(seed=1, steps=4), mode="Record", reference=name, record_every=every, save=True)
        )
        assert ("refdrop_record_every: 2" in out.infotext) == (every == 2)
    refs = listing(server)
    assert refs["half4"]["bytes"] * 2 == refs["full4"]["bytes"] and refs["half4"]["record_every"] == 2
    use = server.generate(refdrop(forge.payload(seed=2, steps=4), mode="Use", reference="half4", coefficient=0.5))
    assert forge.max_diff(use.image, plain[2]) > 0
    assert "refdrop_record_every" not in use.infotext  # Use applies no subset


def test_rename_via_the_api_then_use_by_the_new_name(server, plain):
    server.generate(refdrop(forge.payload(seed=3), mode="Record", reference="old-name", save=True))
    status, body = server.post("/imgcond/v1/refdrop/references/old-name/rename", {"name": "cat"})
    assert status == 400 and "already exists" in body["detail"]
    status, body = server.post("/imgcond/v1/refdrop/references/nobody/rename", {"name": "x"})
    assert status == 400 and "does not exist" in body["detail"]
    status, body = server.post("/imgcond/v1/refdrop/references/old-name/rename", {"name": "a/b"})
    assert status == 400 and "refdrop.reference" in body["detail"]
    status, body = server.post("/imgcond/v1/refdrop/references/old-name/rename", {"nom": "x"})
    assert 400 <= status < 500 and "detail" in body
    status, body = server.post("/imgcond/v1/refdrop/references/old-name/rename", {"name": "new-name"})
    assert status == 200 and body == {"renamed": True, "name": "new-name"}
    refs = listing(server)
    assert "old-name" not in refs and refs["new-name"]["saved"] and refs["new-name"]["in_ram"]
    out = server.generate(refdrop(forge.payload(seed=2), mode="Use", reference="new-name", coefficient=0.5))
    assert forge.max_diff(out.image, plain[2]) > 0
    err = server.generate_error(refdrop(forge.payload(seed=2), mode="Use", reference="old-name"))
    assert "'old-name' does not exist" in err


def test_the_listing_shows_the_library_fields(server, recorded):
    import base64
    import io

    from PIL import Image

    cat = listing(server)["cat"]
    assert cat["family"] == "sd15" and cat["size"].endswith(("KiB", "MiB")) and cat["steps"] == {"first": 3}
    assert cat["resolution"] == "64×64" and cat["kept"] in ("RAM + file", "file") and cat["storage"] == "kv"
    assert cat["precision"] == "as computed" and cat["record_every"] == 1
    head, data = cat["thumbnail"].split(",", 1)
    assert head == "data:image/jpeg;base64"
    thumb = Image.open(io.BytesIO(base64.b64decode(data)))
    assert thumb.size == (64, 64)  # the recorded 64² image (never enlarged past 128 px)
