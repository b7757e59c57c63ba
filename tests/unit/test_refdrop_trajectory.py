"""RefDrop trajectory container: recording, dedup, round trip, dispatch on the storage kind, size target."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.refdrop import file_format, reference
from lib_imgcond.refdrop import layers as rd
from lib_imgcond.refdrop import trajectory as rt
from lib_imgcond.refdrop.forge_patch import _recorded_eval


def cond(seed, tokens=3, ch=8):
    g = torch.Generator().manual_seed(seed)
    return {"c_crossattn": torch.randn(1, tokens, ch, generator=g), "y": torch.randn(1, 5, generator=g)}


def make(steps=3, uncond=True, name="t"):
    traj = rt.Trajectory(name, "sdxl", {"width": 64, "height": 64})
    c, u = cond(1), cond(2)
    for e in range(steps):
        x = torch.full((1, 4, 2, 2), float(e))
        slots = [(0, x, c), (1, x.clone(), u)] if uncond else [(0, x, c)]
        traj.add_call("first", e, slots, torch.tensor(3.0 - e))
    traj.finalize({"first": steps}, {"first": [e / steps for e in range(steps)]}, uncond=uncond)
    return traj


def test_latent_and_constant_conditioning_are_kept_once():
    traj = make()
    assert len(traj) == 3
    assert all(len(entry["xs"]) == 1 for entry in traj.evals["first"])  # cond and uncond share the latent
    assert len(traj.conds["first"]) == 2  # one cond, one uncond, for the whole pass
    per_eval = 4 * 2 * 2 + 1
    assert traj.nbytes == 4 * (3 * per_eval + 2 * (3 * 8 + 5))
    branches, x, sigma, c = traj.calls("first", 2)[0]
    assert branches == [0, 1] and x.shape == (2, 4, 2, 2) and torch.equal(sigma, torch.tensor([1.0, 1.0]))
    assert torch.equal(c["c_crossattn"][1:], cond(2)["c_crossattn"]) and c["y"].shape == (2, 5)


def test_a_changed_conditioning_is_kept_and_an_earlier_one_reused():
    traj = rt.Trajectory("t", "sd15")
    x = torch.zeros(1, 4, 2, 2)
    for e, seed in enumerate((1, 2, 1)):  # prompt editing: [a:b:0.3], then back
        traj.add_call("first", e, [(0, x, cond(seed))], torch.tensor(1.0))
    assert [entry["calls"][0][0][2] for entry in traj.evals["first"]] == [0, 1, 0]


def test_uncond_is_offered_only_when_asked_for_and_recorded():
    assert make(uncond=True).has_pass("first_uncond") and make().branches("first") == (0, 1)
    no = make(uncond=False)
    assert no.has_pass("first") and not no.has_pass("first_uncond") and no.branches("first") == (0,)
    asked_not = make(uncond=True)
    asked_not.finalize({"first": 3}, {"first": [0, 1 / 3, 2 / 3]}, uncond=False)
    assert not asked_not.has_pass("first_uncond")
    assert make().layers("first") == {tuple(x[:3]) for x in rd.layer_table("sdxl")}
    assert make().layers("hires") == set()


def test_round_trip_and_metadata(tmp_path):
    traj = make()
    path = tmp_path / "t.safetensors"
    rt.save(traj, path)
    back = rt.load(path)
    assert isinstance(back, rt.Trajectory) and back.meta["steps"] == {"first": 3, "first_uncond": 3}
    assert back.meta["trace"] == traj.meta["trace"] and back.nbytes == traj.nbytes
    for e in range(3):
        for (b1, x1, s1, c1), (b2, x2, s2, c2) in zip(traj.calls("first", e), back.calls("first", e), strict=True):
            assert b1 == b2 and torch.equal(x1, x2) and torch.equal(s1, s2)
            assert all(torch.equal(c1[k], c2[k]) for k in c1)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata()
    assert meta["format"] == file_format.FORMAT and meta["storage"] == "trajectory" and meta["format_version"] == "2"
    assert meta["family"] == "sdxl" and json.loads(meta["steps"])["first"] == 3
    info = rt.info(path)
    assert info["storage"] == "trajectory" and info["size_bytes"] == path.stat().st_size and info["steps"]["first"] == 3


def test_kv_files_load_through_the_same_dispatch(tmp_path):
    ref = reference.Reference("kv", "sd15", {"trace": {"first": [0.0]}})
    ref.put(("first", 0, "middle", 0, 0), torch.ones(1, 4, 1280), torch.ones(1, 4, 1280))
    file_format.save_reference(ref, tmp_path / "kv.safetensors")
    assert isinstance(rt.load(tmp_path / "kv.safetensors"), reference.Reference)
    assert rt.info(tmp_path / "kv.safetensors")["storage"] == "kv"
    assert rt.storage(ref) == "kv" and rt.storage(make()) == "trajectory"


def test_old_readers_refuse_a_trajectory_and_bad_files_say_why(tmp_path):
    path = tmp_path / "t.safetensors"
    rt.save(make(), path)
    with pytest.raises(ImgcondError, match="holds a 'trajectory' RefDrop reference, not K/V"):
        file_format.load_reference(path)  # the K/V reader (an imgcond before format 2 refuses it by its version)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ImgcondError, match="truncated or corrupt"):
        rt.load(cut)
    with pytest.raises(ImgcondError, match="does not exist"):
        rt.load(tmp_path / "missing.safetensors")
    with pytest.raises(ImgcondError, match="nothing to save"):
        rt.save(rt.Trajectory("e", "sd15"), tmp_path / "e.safetensors")
    with pytest.raises(ImgcondError, match="follows"):
        rt.Trajectory("g", "sd15").add_call("first", 2, [(0, torch.zeros(1, 4, 1, 1), cond(0))], torch.tensor(1.0))


def test_use_maps_evaluations_progress_nearest_like_kv_references():
    traj = make(steps=4)
    assert [_recorded_eval(traj, "first", e, e / 4) for e in range(4)] == [0, 1, 2, 3]  # the same run
    assert [_recorded_eval(traj, "first", e, e / 8) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]  # twice the steps
    assert [_recorded_eval(traj, "first_uncond", e, e / 2) for e in range(2)] == [0, 2]  # half the steps


def test_sdxl_1024_20_steps_fits_ten_megabytes():
    """The size target: SDXL's 4×128×128 fp32 latent and sigma per evaluation, its cond and uncond conditioning
    (77×2048 context, 2816 `y`) once: 6.53 MB (6.22 MiB) for a 20-step single-evaluation sampler."""
    shapes = [(1, 77, 2048), (1, 2816)]
    need = rt.estimate_bytes((1, 4, 128, 128), 20, shapes, branches=2)
    assert need == 6_527_056 and need <= 10_000_000
    traj = rt.Trajectory("xl", "sdxl")
    c = {"c_crossattn": torch.zeros(1, 77, 2048), "y": torch.zeros(1, 2816)}
    u = {"c_crossattn": torch.ones(1, 77, 2048), "y": torch.ones(1, 2816)}
    for e in range(20):
        x = torch.full((1, 4, 128, 128), float(e))
        traj.add_call("first", e, [(0, x, c), (1, x, u)], torch.tensor(float(20 - e)))
    assert traj.nbytes == need
