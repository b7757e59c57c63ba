"""RefDrop Record with fp8 storage and with a step subset (`record_every`), then Use, through the fake UnetPatcher."""

from __future__ import annotations

import pytest
import torch

from lib_imgcond.refdrop import forge_install, forge_patch
from lib_imgcond.refdrop import forge_refdrop as host
from lib_imgcond.refdrop import layers as rd
from tests.glue.fakes import FakeUnetPatcher, fake_p
from tests.glue.test_refdrop_glue import HEADS, VALUES, _clean_library, attn, qkv, run_pass  # noqa: F401 (autouse)

SIGMAS = [4.0, 3.0, 2.0, 1.0, 0.0]  # 4 steps
LAYER = ("output", 3, 0)


def tracker():
    t = forge_patch.PassTracker("first", 4)
    t.schedule = list(SIGMAS)
    return t


def record(precision="as computed", **values):
    """A 4-step Record with different K/V at each step; returns the reference and the per-step (q, k, v)."""
    p = fake_p("sd15", width=64, height=64, sampler_name="Euler", steps=4)
    job = host.plan(p, {**VALUES, "mode": "Record", "record_every": 1, **values}, 0, precision)
    unet, t = FakeUnetPatcher(), tracker()
    forge_install.install(unet, job, t, attn)
    steps = [qkv(10 + i) for i in range(4)]
    for sigma, (q, k, v) in zip(SIGMAS, steps, strict=False):
        run_pass(unet, sigma, q, k, v)
    return host.finish_record(job, {"first": t}, save_file=False), steps


def use(ref, q, k, v, steps_done=0, c=0.5):
    job = host.Job({**VALUES, "record_every": 1}, "sd15", frozenset({LAYER}), uses=[(ref, c)])
    unet, t = FakeUnetPatcher(), tracker()
    forge_install.install(unet, job, t, attn)
    out = None
    for sigma in SIGMAS[: steps_done + 1]:
        out = run_pass(unet, sigma, q, k, v)
    return out


def test_record_every_2_keeps_every_other_evaluation_and_use_maps_by_progress():
    full, steps = record()
    half, _ = record(record_every=2)
    assert half.meta["record_every"] == 2 and half.meta["trace"]["first"] == [0.0, 0.5]
    assert half.meta["steps"] == {"first": 4}  # the sampling steps of the run, not the recorded count
    assert {key.step for key in half} == {0, 1}
    assert half.nbytes * 2 == full.nbytes
    # recorded evaluation 1 holds evaluation 2's K/V
    assert torch.equal(half.get(("first", 1, *LAYER))[0], steps[2][1][1:2])
    q, k, v = qkv(99)
    for e, recorded in ((0, 0), (1, 0), (2, 2), (3, 2)):  # eval 1 (0.25) ties 0 and 0.5: the earlier one
        got = use(half, q, k, v, steps_done=e)
        want = use(full, q, k, v, steps_done=recorded)
        assert torch.equal(got, want), e


def test_record_every_is_refused_below_1():
    with pytest.raises(Exception, match="record_every"):
        rd.recorded_count(4, 0)


def test_fp8_record_then_use_blends_close_to_the_fp32_reference():
    exact, _ = record()
    small, _ = record("fp8")
    assert small.precision == "fp8" and small.nbytes * 4 == exact.nbytes
    q, k, v = qkv(5)
    plain = attn(q, k, v, HEADS)
    got, want = use(small, q, k, v), use(exact, q, k, v)
    assert not torch.equal(got, plain)
    # quantised: fp8 K/V move this output by ~3e-2 (outputs ~2); float32 rounding alone by ~1e-6
    assert (got - want).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)


def test_estimate_uses_the_precision_and_the_subset():
    p = fake_p("sd15", width=64, height=64, sampler_name="Euler", steps=4)
    values = {**VALUES, "mode": "Record", "record_every": 1}
    full = host.estimate_record(p, values, "as computed")
    assert host.estimate_record(p, values, "fp16") * 2 == full
    assert host.estimate_record(p, values, "fp8") * 4 == full
    assert host.estimate_record(p, {**values, "record_every": 2}, "as computed") * 2 == full
    assert host.estimate_record(p, {**values, "record_every": 3}, "as computed") * 2 == full  # evals 0 and 3
    assert host.estimate_record(p, {**values, "record_every": 5}, "as computed") * 4 == full
