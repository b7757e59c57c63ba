"""RefDrop's Forge adapter driven through a fake UnetPatcher the way backend/nn/unet.py calls attn1 replaces."""

from __future__ import annotations

import pytest
import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.refdrop import forge_install, forge_library, forge_patch
from lib_imgcond.refdrop import forge_refdrop as host
from lib_imgcond.refdrop import layers as rd
from lib_imgcond.refdrop.reference import Reference, RefKey
from tests.glue.fakes import FakeUnetPatcher, fake_p

HEADS = 2
VALUES = {
    "mode": "Use", "reference": "r", "coefficient": 0.5, "more_references": "", "layers": "all", "start": 0.0,
    "end": 1.0, "hires": False, "uncond": False, "save": False, "batch_item": 0,
}  # fmt: skip


def attn(q, k, v, heads):
    return rd.sdpa(q, k, v, heads)


def qkv(seed, batch=2, tokens=6, ch=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, ch, generator=g) for _ in range(3)]


def opts(block=("output", 3), index=0, chunks=(1, 0)):
    return {"block": block, "block_index": index, "n_heads": HEADS, "cond_or_uncond": list(chunks)}


def run_pass(unet, tracker_sigmas, q, k, v, **kw):
    """One evaluation: the conditioning modifier (once), then one attn1 call."""
    for mod in unet.model_options["conditioning_modifiers"]:
        mod(None, None, torch.tensor([tracker_sigmas]), None, None, 7.0, {}, 0)
    return unet.run_attn1(q, k, v, opts(**kw))


def record_steps(unet, q, k, v):
    """All three steps of the recorded pass (a recording that stops short of its last step is discarded)."""
    outs = [run_pass(unet, sigma, q, k, v) for sigma in (3.0, 2.0, 1.0)]
    return outs[0]


def record(name="r", **values):
    job = host.Job({**VALUES, "mode": "Record", **values}, "sd15", frozenset(x[:3] for x in rd.layer_table("sd15")))
    job.record = Reference(name, "sd15", {"trace": {}})
    unet = FakeUnetPatcher()
    tracker = forge_patch.PassTracker("first", 3)
    tracker.schedule = [3.0, 2.0, 1.0, 0.0]
    forge_install.install(unet, job, tracker, attn)
    return job, unet, tracker


@pytest.fixture(autouse=True)
def _clean_library():
    forge_library.REFERENCES.clear()
    yield
    forge_library.REFERENCES.clear()


def test_record_stores_cond_row_and_returns_plain_attention():
    job, unet, tracker = record()
    q, k, v = qkv(0)
    out = record_steps(unet, q, k, v)
    assert torch.equal(out, attn(q, k, v, HEADS))
    host.finish_record(job, {"first": tracker}, save_file=False)
    kr, vr = job.record.get(("first", 0, "output", 3, 0))
    assert torch.equal(kr, k[1:2]) and torch.equal(vr, v[1:2])  # chunks [uncond, cond]: cond is row 1
    assert forge_library.REFERENCES["r"].meta["trace"]["first"] == [0.0, 1 / 3, 2 / 3]
    assert forge_library.REFERENCES["r"].meta["steps"] == {"first": 3}  # the uncond branch was not recorded: not listed


def test_use_with_identical_kv_is_bit_exact_and_other_kv_blends():
    job, unet, tracker = record()
    q, k, v = qkv(0)
    record_steps(unet, q, k, v)
    host.finish_record(job, {"first": tracker}, save_file=False)
    use = host.Job(dict(VALUES), "sd15", job.layers, uses=[(forge_library.REFERENCES["r"], 0.7)])
    unet2 = FakeUnetPatcher()
    t2 = forge_patch.PassTracker("first", 3)
    t2.schedule = [3.0, 2.0, 1.0, 0.0]
    forge_install.install(unet2, use, t2, attn)
    assert torch.equal(run_pass(unet2, 3.0, q, k, v), attn(q, k, v, HEADS))
    q2, k2, v2 = qkv(1)
    unet3 = FakeUnetPatcher()
    t3 = forge_patch.PassTracker("first", 3)
    t3.schedule = [3.0, 2.0, 1.0, 0.0]
    forge_install.install(unet3, use, t3, attn)
    out = run_pass(unet3, 3.0, q2, k2, v2)
    plain = attn(q2, k2, v2, HEADS)
    ref = attn(q2[1:], k[1:2], v[1:2], HEADS)
    assert torch.equal(out[0], plain[0])  # uncond row untouched by default
    torch.testing.assert_close(out[1:], 0.3 * plain[1:] + 0.7 * ref)


def test_window_and_layer_selection_leave_attention_alone():
    job, unet, tracker = record()
    q, k, v = qkv(0)
    record_steps(unet, q, k, v)
    host.finish_record(job, {"first": tracker}, save_file=False)
    ref = forge_library.REFERENCES["r"]
    q2, k2, v2 = qkv(2)
    for values, layers in (({"start": 0.5}, job.layers), ({}, frozenset({("input", 1, 0)}))):
        use = host.Job({**VALUES, **values}, "sd15", layers, uses=[(ref, 0.9)])
        unet2, t2 = FakeUnetPatcher(), forge_patch.PassTracker("first", 3)
        t2.schedule = [3.0, 2.0, 1.0, 0.0]
        forge_install.install(unet2, use, t2, attn)
        assert torch.equal(run_pass(unet2, 3.0, q2, k2, v2), attn(q2, k2, v2, HEADS))


def test_chains_to_an_existing_attn1_replace():
    calls = []

    def theirs(q, k, v, extra):
        calls.append(extra["block"])
        return attn(q, k, v, extra["n_heads"]) * 2

    job, _, tracker = record()
    unet = FakeUnetPatcher()
    unet.set_model_replace_all(theirs, "attn1")
    forge_install.install(unet, job, tracker, attn)
    q, k, v = qkv(0)
    out = run_pass(unet, 3.0, q, k, v)
    assert calls == [("output", 3)] and torch.equal(out, attn(q, k, v, HEADS) * 2)
    again = unet.clone()  # a clone of our own patch must not chain to itself
    forge_install.install(again, job, tracker, attn)
    assert torch.equal(run_pass(again, 2.0, q, k, v), attn(q, k, v, HEADS) * 2)


def test_recorded_eval_maps_by_progress_when_runs_differ():
    ref = Reference("x", "sd15", {"trace": {"first": [0.0, 0.25, 0.5, 0.75]}})
    assert forge_patch._recorded_eval(ref, "first", 2, 0.5) == 2
    assert forge_patch._recorded_eval(ref, "first", 1, 0.5) == 2
    assert forge_patch._recorded_eval(ref, "first", 9, 0.99) == 3


def test_tracker_follows_the_schedule_and_substeps():
    t = forge_patch.PassTracker("hires", 2)
    t.schedule = [5.0, 4.0, 3.0, 2.0, 0.0]
    for sigma in (3.0, 2.5, 2.0):  # img2img tail: starts at index 2; 2.5 is a sub-step of step 0
        t.on_eval(sigma)
    assert (t.first, t.n_steps, t.trace) == (2, 2, [0.0, 0.0, 0.5])


def test_plan_errors_are_clear(monkeypatch, tmp_path):
    monkeypatch.setattr(host.library, "references_dir", lambda: str(tmp_path))
    p = fake_p("sd15", width=64, height=64, sampler_name="Euler a", batch_size=1)
    with pytest.raises(ImgcondError, match="does not exist"):
        host.plan(p, dict(VALUES, reference="missing"), 0, False)
    with pytest.raises(ArgumentError, match="batch_item"):
        host.plan(p, dict(VALUES, batch_item=3), 0, False)
    with pytest.raises(
        ImgcondError, match=r"needs a SD1\.5, SDXL, Flux, Chroma, .* model.*unknown architecture: its diffusion engine"
    ):
        host.plan(fake_p("chroma"), dict(VALUES), 0, False)
    with pytest.raises(ImgcondError, match="RAM budget"):
        host.plan(p, dict(VALUES, mode="Record"), 1000, False)
    with pytest.raises(ArgumentError, match="more_references"):
        host.parse_more("cat:2")
    assert host.parse_more(" cat:0.3, dog:-0.2 ") == [("cat", 0.3), ("dog", -0.2)]


def test_image_mode_captures_reference_before_each_evaluation():
    from types import SimpleNamespace

    values = dict(VALUES, mode="Image", coefficient=0.6)
    ref = Reference("img", "sd15", {"trace": {}, "source": "image"})
    job = host.Job(values, "sd15", frozenset({("output", 3, 0)}), uses=[(ref, 0.6)], record=ref)
    job.image_latent = torch.randn(1, 8, 2, 3, generator=torch.Generator().manual_seed(5))
    unet = FakeUnetPatcher()
    unet.model.predictor = SimpleNamespace(noise_scaling=lambda sigma, noise, latent: latent + sigma * noise)
    tracker = forge_patch.PassTracker("first", 2)
    tracker.schedule = [2.0, 1.0, 0.0]
    forge_install.install(unet, job, tracker, attn)
    calls = []

    def apply_model(x, t, c_crossattn=None, transformer_options=None):
        tokens = x.flatten(2).transpose(1, 2)  # (B, h·w, C)
        extra = {"block": ("output", 3), "block_index": 0, "n_heads": HEADS, **transformer_options}
        calls.append(list(extra["cond_or_uncond"]))
        return unet.run_attn1(tokens, tokens, tokens, extra)

    x = torch.randn(2, 8, 2, 3, generator=torch.Generator().manual_seed(6))
    args = {
        "input": x,
        "timestep": torch.tensor([2.0, 2.0]),
        "c": {"c_crossattn": torch.zeros(2, 1, 4), "transformer_options": {"cond_or_uncond": [1, 0]}},
        "cond_or_uncond": [1, 0],
    }
    for mod in unet.model_options["conditioning_modifiers"]:
        mod(None, None, torch.tensor([2.0]), None, None, 7.0, {}, 0)
    out = unet.model_options["model_function_wrapper"](apply_model, args)
    assert calls == [[0], [1, 0]]  # the reference forward (cond only), then the real batch
    assert ("first", 0, "output", 3, 0) in ref
    tokens = x.flatten(2).transpose(1, 2)
    plain = attn(tokens, tokens, tokens, HEADS)
    assert torch.equal(out[0], plain[0]) and not torch.equal(out[1], plain[1])


def test_fused_path_matches_separate_calls():
    q, k, v = qkv(7, batch=4)
    kr, vr = qkv(8, batch=1)[1:]
    kr2, vr2 = qkv(9, batch=1)[1:]
    uses = [(None, 0.4), (None, -0.2)]
    plan = {0: [(1, kr, vr)], 1: [(1, kr2, vr2)]}  # chunks [uncond, cond], b = 2: blend the cond rows
    kernel = lambda a, b, c, _rows: attn(a, b, c, HEADS)  # noqa: E731
    fused = forge_patch._fused(q, k, v, 2, plan, uses, kernel)
    separate = forge_patch._blend(attn(q, k, v, HEADS), q.clone(), k, v, 2, plan, uses, kernel)
    torch.testing.assert_close(fused, separate)
    assert torch.equal(fused[:2], attn(q, k, v, HEADS)[:2])


def test_library_lists_a_corrupt_file_as_broken_beside_the_good_ones(monkeypatch, tmp_path):
    monkeypatch.setattr(host.library, "references_dir", lambda: str(tmp_path))
    job, unet, tracker = record("good")
    record_steps(unet, *qkv(0))
    host.finish_record(job, {"first": tracker}, save_file=True)
    forge_library.REFERENCES.clear()  # listed from its file, as after a restart
    (tmp_path / "bad.safetensors").write_bytes(torch.Generator().manual_seed(0).seed().to_bytes(8, "little") * 64)
    rows = {r["name"]: r for r in forge_library.describe()}
    assert set(rows) == {"bad", "good"}
    assert rows["good"]["broken"] is None and rows["good"]["family"] == "sd15" and rows["good"]["saved"]
    assert "bad.safetensors is truncated or corrupt" in rows["bad"]["broken"] and rows["bad"]["family"] is None
    with pytest.raises(ImgcondError, match="truncated or corrupt"):
        forge_library.lookup("bad")  # Use of it: the same clear error
    assert forge_library.delete("bad") and not (tmp_path / "bad.safetensors").exists()
    assert [r["name"] for r in forge_library.describe()] == ["good"]


def test_an_interrupted_recording_is_discarded_with_a_message(monkeypatch, tmp_path):
    monkeypatch.setattr(host.library, "references_dir", lambda: str(tmp_path))
    job, unet, tracker = record("half", save=True)
    run_pass(unet, 3.0, *qkv(0))  # step 1 of 3, then the user pressed Interrupt
    with pytest.raises(ImgcondError, match=r"recording of 'half' was interrupted \(first pass: step 1 of 3\)"):
        host.finish_record(job, {"first": tracker}, save_file=True)
    assert "half" not in forge_library.REFERENCES and not list(tmp_path.iterdir()) and job.record is None
    job, unet, tracker = record("whole")
    record_steps(unet, *qkv(0))  # all steps ran, but the host says the job was interrupted (e.g. a later image)
    with pytest.raises(ImgcondError, match="the job was interrupted"):
        host.finish_record(job, {"first": tracker}, save_file=False, interrupted=True)
    assert "whole" not in forge_library.REFERENCES


def test_uncond_branch_listed_only_when_recorded():
    job, unet, tracker = record("both", uncond=True)
    record_steps(unet, *qkv(0))
    host.finish_record(job, {"first": tracker}, save_file=False)
    assert forge_library.REFERENCES["both"].meta["steps"] == {"first": 3, "first_uncond": 3}


def test_release_lets_a_deleted_reference_go_although_the_patched_clone_lives_on(monkeypatch, tmp_path):
    import gc
    import weakref

    monkeypatch.setattr(host.library, "references_dir", lambda: str(tmp_path))

    job, unet, tracker = record("gone")
    record_steps(unet, *qkv(0))
    host.finish_record(job, {"first": tracker}, save_file=False)
    ref = weakref.ref(forge_library.REFERENCES["gone"])
    use = host.Job(dict(VALUES), "sd15", job.layers, uses=[(forge_library.REFERENCES["gone"], 0.5)])
    clone, t2 = FakeUnetPatcher(), forge_patch.PassTracker("first", 3)
    t2.schedule = [3.0, 2.0, 1.0, 0.0]
    forge_install.install(clone, use, t2, attn)  # the model keeps this clone (and its closures) until the next job
    run_pass(clone, 3.0, *qkv(1))
    host.release(job)
    host.release(use)
    assert forge_library.delete("gone")
    gc.collect()
    assert ref() is None, "the deleted reference is still reachable"
    assert clone.model_options["transformer_options"]["patches_replace"]["attn1"]  # the clone itself lives on


def test_the_first_copy_of_a_recording_shows_status(monkeypatch):
    from types import SimpleNamespace

    from lib_imgcond.host import progress

    state = SimpleNamespace(textinfo="sampling", sampling_step=3, sampling_steps=20)
    monkeypatch.setattr(progress, "_state", lambda: state)
    values = dict(VALUES, mode="Record")
    job = host.Job(values, "sd15", frozenset({("output", 3, 0)}))
    job.record = Reference("rec", "sd15", {"trace": {}})
    seen = []
    put_many = job.record.put_many

    def spy(items):
        seen.append(state.textinfo)
        return put_many(items)

    monkeypatch.setattr(job.record, "put_many", spy)
    runner = forge_patch.Runner(job, forge_patch.PassTracker("first", 2))
    kv = torch.randn(1, 4, 8)
    for step in range(2):
        runner.pending.append((RefKey("first", step, "output", 3, 0), kv, kv))
        runner.flush()
    assert seen == ["RefDrop: allocating host memory for the recording", "sampling"]
    assert state.textinfo == "sampling" and state.sampling_step == 3
