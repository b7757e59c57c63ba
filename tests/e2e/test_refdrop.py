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


def test_positive_and_negative_c_change_the_image(server, recorded, plain):
    pos = server.generate(refdrop(forge.payload(seed=2), mode="Use", reference="cat", coefficient=0.5))
    neg = server.generate(refdrop(forge.payload(seed=2), mode="Use", reference="cat", coefficient=-0.3))
    assert forge.max_diff(pos.image, plain[2]) > 0
    assert forge.max_diff(neg.image, plain[2]) > 0
    assert forge.max_diff(pos.image, neg.image) > 0
    assert "refdrop_coefficient: 0.5" in pos.infotext and "refdrop_reference: cat" in pos.infotext
    again = server.generate(forge.payload(seed=2))
    assert forge.max_diff(again.image, plain[2]) == 0  # no leak into a plain run
    pytest.refdrop_pos = pos.image


def test_positional_args_match_named_args(server, recorded):
    named = server.generate(refdrop(forge.payload(seed=2), mode="Use", reference="cat", coefficient=0.5))
    positional = server.generate(forge.with_script(forge.payload(seed=2), TITLE, [True, "Use", "cat", 0.5]))
    assert forge.max_diff(named.image, positional.image) == 0


def test_layers_window_and_multi_reference(server, recorded, plain):
    body = refdrop(forge.payload(seed=2), mode="Use", reference="cat", coefficient=0.5, layers="output", start=0.3)
    out = server.generate(body)
    assert forge.max_diff(out.image, plain[2]) > 0
    assert forge.max_diff(out.image, pytest.refdrop_pos) > 0
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


def test_saved_reference_survives_restart(server, recorded):
    server.restart()
    out = server.generate(refdrop(forge.payload(seed=2), mode="Use", reference="cat", coefficient=0.5))
    assert forge.max_diff(out.image, pytest.refdrop_pos) == 0


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

    from lib_imgcond.core import refdrop_store as store

    folder = server.data_dir / "models" / "imgcond" / "refdrop"
    folder.mkdir(parents=True, exist_ok=True)
    xl = store.Reference("xl", "sdxl", {"width": 64, "height": 64, "trace": {"first": [0.0]}})
    xl.put(("first", 0, "middle", 0, 0), torch.zeros(1, 4, 1280), torch.zeros(1, 4, 1280))
    store.save_reference(xl, folder / "xl.safetensors")
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
