"""RefDrop trajectory storage through the Forge adapter: Record keeps the model inputs, Use replays them (same
composition as at record time) and blends the K/V the replay produced; a same-input Use gives the plain output."""

from __future__ import annotations

import pytest
import torch

from lib_imgcond.common.errors import ArgumentError
from lib_imgcond.refdrop import forge_install, forge_library, forge_patch
from lib_imgcond.refdrop import forge_refdrop as host
from lib_imgcond.refdrop import layers as rd
from lib_imgcond.refdrop import trajectory as rt
from tests.glue.fakes import FakeUnetPatcher, fake_p

HEADS = 2
SIGMAS = [3.0, 2.0, 1.0]
VALUES = {
    "mode": "Record", "reference": "t", "coefficient": 0.5, "more_references": "", "layers": "all", "start": 0.0,
    "end": 1.0, "hires": False, "uncond": False, "save": False, "batch_item": 0, "image": None,
    "storage": "Trajectory",
}  # fmt: skip
LAYERS = frozenset({("output", 3, 0), ("middle", 0, 0)})


def attn(q, k, v, heads):
    return rd.sdpa(q, k, v, heads)


class Model:
    """A two-site 'UNet': tokens from the latent, sigma and context, through both attn1 sites (the fake patcher)."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __call__(self, x, t, c_crossattn=None, y=None, transformer_options=None):
        chunks = list(transformer_options["cond_or_uncond"])
        self.calls.append(chunks)
        h = x.flatten(2).transpose(1, 2) * t.view(-1, 1, 1) + c_crossattn.mean(1, keepdim=True) + y[:, None, :1]
        out = []
        for block in (("middle", 0), ("output", 3)):
            extra = {"block": block, "block_index": 0, "n_heads": HEADS, "cond_or_uncond": chunks}
            q, k, v = h, h * 0.5, h + 1
            patched = self.unet.run_attn1(q, k, v, extra)
            h = attn(q, k, v, HEADS) if patched is None else patched
            out.append(h)
        return torch.cat(out, 1)


def conditioning(batch_chunks, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = {0: torch.randn(1, 3, 8, generator=g), 1: torch.randn(1, 3, 8, generator=g)}
    ys = {0: torch.randn(1, 6, generator=g), 1: torch.randn(1, 6, generator=g)}
    return torch.cat([table[b] for b in batch_chunks]), torch.cat([ys[b] for b in batch_chunks])


def run(job, latents, chunks=(1, 0), seed=0):
    """One pass of len(SIGMAS) evaluations through the patched wrapper; returns the outputs and the model's calls."""
    unet = FakeUnetPatcher()
    tracker = forge_patch.PassTracker("first", len(SIGMAS))
    tracker.schedule = [*SIGMAS, 0.0]
    forge_install.install(unet, job, tracker, attn)
    model = Model(unet)
    ctx, y = conditioning(chunks)
    outs = []
    for sigma, x in zip(SIGMAS, latents, strict=True):
        for mod in unet.model_options["conditioning_modifiers"]:
            mod(None, None, torch.tensor([sigma]), None, None, 7.0, {}, 0)
        batch = torch.cat([x] * len(chunks))
        args = {
            "input": batch,
            "timestep": torch.full((len(chunks),), sigma),
            "c": {"c_crossattn": ctx, "y": y, "transformer_options": {"cond_or_uncond": list(chunks)}},
            "cond_or_uncond": list(chunks),
        }
        wrapper = unet.model_options.get("model_function_wrapper")
        outs.append(wrapper(model, args) if wrapper else model(args["input"], args["timestep"], **args["c"]))
    return outs, model.calls, tracker


def latents(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 8, 2, 3, generator=g) for _ in SIGMAS]


def plain(lat, chunks=(1, 0)):
    job = host.Job(dict(VALUES, mode="Use", storage="K/V"), "sd15", LAYERS)
    return run(job, lat, chunks)[0]


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    monkeypatch.setattr(host.library, "references_dir", lambda: str(tmp_path))
    forge_library.REFERENCES.clear()
    yield
    forge_library.REFERENCES.clear()


def record(lat, **values):
    job = host.plan(fake_p(width=64, height=64), dict(VALUES, **values), 0, False)
    assert job.trajectory is not None and job.record is None
    outs, calls, tracker = run(job, lat)
    host.finish_record(job, {"first": tracker}, save_file=values.get("save", False))
    return outs, calls


def use(lat, c=0.5, **values):
    job = host.plan(fake_p(width=64, height=64), dict(VALUES, mode="Use", coefficient=c, **values), 0, False)
    return run(job, lat)


def test_record_keeps_the_inputs_and_leaves_the_output_unchanged():
    lat = latents(1)
    outs, calls = record(lat)
    assert calls == [[1, 0]] * 3  # no extra model call while recording
    assert all(torch.equal(a, b) for a, b in zip(outs, plain(lat), strict=True))
    ref = forge_library.REFERENCES["t"]
    assert isinstance(ref, rt.Trajectory) and len(ref) == 3 and ref.meta["steps"] == {"first": 3}
    branches, x, sigma, _c = ref.calls("first", 1)[0]
    assert branches == [1, 0] and torch.equal(x, torch.cat([lat[1]] * 2)) and sigma.tolist() == [2.0, 2.0]


def test_use_replays_with_the_recorded_composition_and_same_inputs_give_the_plain_output():
    lat = latents(1)
    record(lat)
    outs, calls, _ = use(lat, c=0.8)
    assert calls == [[1, 0], [1, 0]] * 3  # the replay (cond and uncond rows, as recorded), then the real call
    assert all(torch.equal(a, b) for a, b in zip(outs, plain(lat), strict=True))
    other = latents(2)
    changed, _, _ = use(other, c=0.5)
    base = plain(other)
    assert not torch.equal(changed[1], base[1])
    assert torch.equal(changed[1][:1], base[1][:1])  # the uncond chunk (first) is not blended by default


def test_window_and_c_zero_skip_the_replay():
    lat = latents(1)
    record(lat)
    _, calls, _ = use(latents(2), c=0.5, start=0.5)
    assert calls == [[1, 0], [1, 0], [1, 0], [1, 0]]  # steps 0 (outside), 1 and 2 replay
    outs, calls, _ = use(latents(2), c=0.0)
    assert calls == [[1, 0]] * 3 and all(torch.equal(a, b) for a, b in zip(outs, plain(latents(2)), strict=True))


def test_uncond_branch_blends_from_the_replay_too():
    lat = latents(1)
    record(lat, uncond=True)
    assert forge_library.REFERENCES["t"].has_pass("first_uncond")
    outs, _, _ = use(lat, c=0.7, uncond=True)
    assert all(torch.equal(a, b) for a, b in zip(outs, plain(lat), strict=True))
    changed, _, _ = use(latents(2), c=0.7, uncond=True)
    assert not torch.equal(changed[1][:1], plain(latents(2))[1][:1])


def test_saved_trajectory_reloads_and_gives_the_same_output(tmp_path):
    lat = latents(1)
    record(lat, save=True)
    before, _, _ = use(latents(2))
    forge_library.REFERENCES.clear()  # as after a restart
    rows = {r["name"]: r for r in forge_library.describe()}
    assert rows["t"]["storage"] == "trajectory" and rows["t"]["bytes"] == (tmp_path / "t.safetensors").stat().st_size
    after, _, _ = use(latents(2))
    assert isinstance(forge_library.REFERENCES["t"], rt.Trajectory)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_trajectory_is_refused_where_it_cannot_work():
    from types import SimpleNamespace

    flux = fake_p("flux", width=64, height=64)
    flux.sd_model.forge_objects.unet.model.diffusion_model = SimpleNamespace(
        double_blocks=[None] * 19, single_blocks=[None] * 38, hidden_size=3072
    )
    with pytest.raises(ArgumentError, match=r"refdrop\.storage='Trajectory'.*Flux"):
        host.plan(flux, dict(VALUES), 0, False)
    with pytest.raises(ArgumentError, match=r"refdrop\.storage='Trajectory'.*mode Image"):
        host.plan(fake_p(width=64, height=64), dict(VALUES, mode="Image"), 0, False)
