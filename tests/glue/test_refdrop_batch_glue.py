"""RefDrop mode Batch through the Forge adapter's attn1 replace (fake UnetPatcher, as backend/nn/unet.py calls it)."""

from __future__ import annotations

import pytest
import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.refdrop import batch as cb
from lib_imgcond.refdrop import families, forge_install, forge_patch
from lib_imgcond.refdrop import forge_refdrop as host
from lib_imgcond.refdrop import layers as rd
from tests.glue.fakes import FakeUnetPatcher, fake_p

HEADS = 2
VALUES = {
    "mode": "Batch", "reference": "reference", "coefficient": 0.5, "more_references": "", "layers": "all",
    "start": 0.0, "end": 1.0, "hires": False, "uncond": False, "save": False, "batch_item": 0, "image": None,
    "rate": 0.5, "prompt_lines": "", "batch_sets": cb.SETS[0],
}  # fmt: skip
ALL = frozenset(x[:3] for x in rd.layer_table("sd15"))


def attn(q, k, v, heads):
    return rd.sdpa(q, k, v, heads)


def qkv(seed, rows=4, tokens=6, ch=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, tokens, ch, generator=g, dtype=torch.float64) for _ in range(3)]


def opts(chunks=(1, 0), block=("output", 3), index=0):
    return {"block": block, "block_index": index, "n_heads": HEADS, "cond_or_uncond": list(chunks)}


def make(job, pass_name="first"):
    unet = FakeUnetPatcher()
    tracker = forge_patch.PassTracker(pass_name, 3)
    tracker.schedule = [3.0, 2.0, 1.0, 0.0]
    forge_install.install(unet, job, tracker, attn)
    return unet


def evaluate(unet, sigma, q, k, v, **kw):
    for mod in unet.model_options["conditioning_modifiers"]:
        mod(None, None, torch.tensor([sigma]), None, None, 7.0, {}, 0)
    return unet.run_attn1(q, k, v, opts(**kw))


def expected_group(q, k, v, c, rate, seed):
    return cb.consistent_attention(q, k, v, c, cb.others_shared(k, v, rate, seed), lambda *a: attn(*a, HEADS))


def test_only_the_cond_rows_share_and_each_chunk_is_its_own_group():
    job = host.Job(dict(VALUES), "sd15", ALL, batch_seed=5)
    q, k, v = qkv(0)
    out = evaluate(make(job), 3.0, q, k, v)  # chunks [uncond, cond], batch 2
    plain = attn(q, k, v, HEADS)
    assert torch.equal(out[:2], plain[:2])  # uncond untouched by default
    seed = cb.derive_seed(5, "first", 0, "output", 3, 0, 0, 0)
    torch.testing.assert_close(out[2:], expected_group(q[2:], k[2:], v[2:], 0.5, 0.5, seed))
    both = host.Job({**VALUES, "uncond": True}, "sd15", ALL, batch_seed=5)
    out = evaluate(make(both), 3.0, q, k, v)
    useed = cb.derive_seed(5, "first", 0, "output", 3, 0, 1, 0)
    torch.testing.assert_close(out[:2], expected_group(q[:2], k[:2], v[:2], 0.5, 0.5, useed))
    torch.testing.assert_close(out[2:], expected_group(q[2:], k[2:], v[2:], 0.5, 0.5, seed))


def test_window_layers_and_c_zero_leave_the_attention_alone():
    q, k, v = qkv(1)
    plain = attn(q, k, v, HEADS)
    for values, layers in (({"start": 0.5}, ALL), ({}, frozenset({("input", 1, 0)})), ({"coefficient": 0.0}, ALL)):
        job = host.Job({**VALUES, **values}, "sd15", layers, batch_seed=1)
        assert torch.equal(evaluate(make(job), 3.0, q, k, v), plain)
    job = host.Job({**VALUES, "start": 0.5}, "sd15", ALL, batch_seed=1)
    unet = make(job)
    evaluate(unet, 3.0, q, k, v)
    assert torch.equal(evaluate(unet, 2.0, q, k, v), plain)  # step 1 of 3: before the window
    assert not torch.equal(evaluate(unet, 1.0, q, k, v), plain)  # step 2 of 3: inside it


def test_first_batch_pool_feeds_the_later_batches():
    values = {**VALUES, "batch_sets": cb.SETS[1]}
    job = host.Job(values, "sd15", ALL, batch_seed=9, budget=10**9)
    q, k, v = qkv(2)
    first = evaluate(make(job), 3.0, q, k, v)
    site = ("first", 0, "output", 3, 0, 0, 0)
    ks, vs = job.pool[site]
    assert ks.shape == (1, round(0.5 * 6), 8) and job.pool_bytes == 2 * ks.numel() * 8
    own = host.Job(dict(VALUES), "sd15", ALL, batch_seed=9)
    assert torch.equal(first, evaluate(make(own), 3.0, q, k, v))  # the first batch itself is unchanged by keeping
    job.iteration, job.batch_seed = 1, 11
    q2, k2, v2 = qkv(3)
    later = evaluate(make(job), 3.0, q2, k2, v2)
    want = cb.consistent_attention(q2[2:], k2[2:], v2[2:], 0.5, (ks, vs), lambda *a: attn(*a, HEADS))
    torch.testing.assert_close(later[2:], want)
    host.release(job)
    assert not job.pool
    tight = host.Job(values, "sd15", ALL, batch_seed=9, budget=10)
    with pytest.raises(ImgcondError, match="RAM budget"):
        evaluate(make(tight), 3.0, q, k, v)


def test_plan_checks_batch_family_rate_lines_and_budget():
    p = fake_p("sd15", width=64, height=64, sampler_name="Euler a", batch_size=1)
    with pytest.raises(ArgumentError, match=r"refdrop\.mode='Batch'.*batch size of at least 2"):
        host.plan(p, dict(VALUES), 0, False)
    p = fake_p("sd15", width=64, height=64, sampler_name="Euler a", batch_size=2, n_iter=2)
    p.all_prompts = ["cat"] * 4
    p.all_hr_prompts = ["cat"] * 4
    with pytest.raises(ImgcondError, match="RAM budget"):
        host.plan(p, {**VALUES, "batch_sets": cb.SETS[1]}, 1000, False)
    job = host.plan(p, {**VALUES, "prompt_lines": "a\nb"}, 0, False)
    assert job.values["mode"] == "Batch" and job.uses == [] and job.record is None
    assert p.all_prompts == p.all_hr_prompts == ["cat, a", "cat, b", "cat, a", "cat, b"]
    host.plan(p, {**VALUES, "prompt_lines": "a\nb"}, 0, False)
    assert p.all_prompts[0] == "cat, a"  # once per job
    assert host.infotext_skip(VALUES, 1) == ("reference", "more_references", "save", "batch_item", "batch_sets")
    assert "batch_sets" not in host.infotext_skip(VALUES, 2)
    assert host.infotext_skip({**VALUES, "mode": "Use"}, 2) == ("rate", "batch_sets")


def test_dit_joint_call_shares_image_tokens_only_and_blends_image_outputs_only():
    from lib_imgcond.refdrop.forge_consistent import BatchRunner
    from lib_imgcond.refdrop.forge_patch import Joint

    def packed(q, k, v, _rows=None):  # (B, heads, T, d) → (B, T, heads·d), as the DiT kernels return
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    family = families.dit_family("flux", (2, 2), 8)
    key = ("double", 1, 0)
    job = host.Job(dict(VALUES), family, frozenset({key}), batch_seed=3)
    tracker = forge_patch.PassTracker("first", 3)
    tracker.schedule = [3.0, 2.0, 1.0, 0.0]
    runner = BatchRunner(job, tracker)
    runner.on_eval(3.0)
    g = torch.Generator().manual_seed(4)
    n_txt, n_img = 3, 8
    q, k, v = (torch.randn(2, HEADS, n_txt + n_img, 4, generator=g, dtype=torch.float64) for _ in range(3))
    out = runner.attend(key, q, k, v, [0], lambda: packed(q, k, v), packed, joint=Joint(n_txt))
    plain = packed(q, k, v)
    assert torch.equal(out[:, :n_txt], plain[:, :n_txt])  # text tokens keep their own attention
    seed = cb.derive_seed(3, "first", 0, *key, 0, 0)
    ks, vs = cb.others_shared(k[:, :, n_txt:], v[:, :, n_txt:], 0.5, seed)
    assert ks.shape == (2, HEADS, 4, 4)  # half of the other image's 8 image tokens, no text token
    shared_out = packed(q, torch.cat([k, ks], 2), torch.cat([v, vs], 2))
    torch.testing.assert_close(out[:, n_txt:], 0.5 * plain[:, n_txt:] + 0.5 * shared_out[:, n_txt:])
