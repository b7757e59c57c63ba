"""RefDrop consistent batch maths (refdrop.batch)."""

from __future__ import annotations

import pytest
import torch

from lib_imgcond.common.errors import ArgumentError
from lib_imgcond.refdrop import batch as cb
from lib_imgcond.refdrop import layers as rd

HEADS = 2


def attn(q, k, v):
    return rd.sdpa(q, k, v, HEADS)


def qkv(seed, batch=3, tokens=5, ch=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, ch, generator=g, dtype=dtype) for _ in range(3)]


def run(q, k, v, c, rate, seed=7):
    return cb.consistent_attention(q, k, v, c, cb.others_shared(k, v, rate, seed), attn)


def test_c_zero_and_rate_zero_are_the_plain_attention():
    q, k, v = qkv(0)
    plain = attn(q, k, v)
    assert torch.equal(run(q, k, v, 0.0, 0.5), plain)
    assert torch.equal(run(q, k, v, 0.8, 0.0), plain)
    assert cb.others_shared(k, v, 0.0, 1)[0].shape == (3, 0, 8)


def test_the_formula_row_by_row():
    q, k, v = qkv(1)
    c, rate, seed = 0.4, 0.5, 11
    idx = cb.sample_indices(3, 5, rate, seed)
    out = run(q, k, v, c, rate, seed)
    flat_k, flat_v = k.reshape(15, 8), v.reshape(15, 8)
    for i in range(3):
        kj = torch.cat([k[i], flat_k[idx[i]]])[None]
        vj = torch.cat([v[i], flat_v[idx[i]]])[None]
        want = (1 - c) * attn(q[i : i + 1], k[i : i + 1], v[i : i + 1]) + c * attn(q[i : i + 1], kj, vj)
        torch.testing.assert_close(out[i : i + 1], want)


def test_linear_in_c():
    q, k, v = qkv(2)
    o0, o1, oc = (run(q, k, v, c, 0.6) for c in (0.0, 1.0, 0.35))
    torch.testing.assert_close(oc, 0.65 * o0 + 0.35 * o1)
    on = run(q, k, v, -0.3, 0.6)
    torch.testing.assert_close(on, 1.3 * o0 - 0.3 * o1)


def test_an_image_never_attends_to_its_own_tokens_twice_and_picks_distinct_tokens():
    for batch, tokens, rate in ((2, 7, 1.0), (4, 9, 0.5), (3, 64, 0.13)):
        idx = cb.sample_indices(batch, tokens, rate, 5)
        assert idx.shape == (batch, round(rate * (batch - 1) * tokens))
        for i in range(batch):
            row = idx[i].tolist()
            assert len(set(row)) == len(row)
            assert all(t // tokens != i for t in row)
            assert all(0 <= t < batch * tokens for t in row)
    full = cb.sample_indices(3, 4, 1.0, 0)
    assert sorted(full[0].tolist()) == list(range(4, 12))  # r = 1: every token of the others, none of its own


def test_the_same_subset_for_k_and_v_and_for_a_head_split_layout():
    _q, k, v = qkv(3, batch=3, tokens=6)
    ks, vs = cb.others_shared(k, v, 0.5, 9)
    idx = cb.sample_indices(3, 6, 0.5, 9)
    assert torch.equal(ks, k.reshape(18, 8)[idx]) and torch.equal(vs, v.reshape(18, 8)[idx])
    k4 = k.view(3, 6, HEADS, 4).transpose(1, 2)  # (B, heads, N, head_dim)
    assert torch.equal(cb.gather(k4, idx), ks.view(3, -1, HEADS, 4).transpose(1, 2))


def test_deterministic_for_a_seed_and_new_per_site():
    q, k, v = qkv(4)
    assert torch.equal(run(q, k, v, 0.5, 0.4, seed=3), run(q, k, v, 0.5, 0.4, seed=3))
    assert not torch.equal(cb.sample_indices(4, 50, 0.3, 3), cb.sample_indices(4, 50, 0.3, 4))
    s1 = cb.derive_seed(123, "first", 0, "input", 1, 0)
    assert s1 == cb.derive_seed(123, "first", 0, "input", 1, 0)
    assert (
        len({s1, cb.derive_seed(123, "first", 1, "input", 1, 0), cb.derive_seed(124, "first", 0, "input", 1, 0)}) == 3
    )


def test_batch_size_one_and_bad_rate_are_refused():
    _q, k, v = qkv(5, batch=1)
    with pytest.raises(ArgumentError, match=r"refdrop\.mode='Batch'.*batch size of at least 2"):
        cb.others_shared(k, v, 0.5, 0)
    with pytest.raises(ArgumentError, match=r"refdrop\.rate"):
        cb.sample_indices(2, 4, 1.5, 0)


def test_pool_is_a_distinct_subset_of_the_whole_group_and_serves_every_row():
    _q, k, v = qkv(6, batch=4, tokens=10)
    idx = cb.pool_indices(4, 10, 0.5, 2)
    assert idx.numel() == 15 and len(set(idx.tolist())) == 15
    ks, vs = cb.pooled(k, v, 0.5, 2)
    assert ks.shape == (1, 15, 8) and torch.equal(ks[0], k.reshape(40, 8)[idx])
    q2, k2, v2 = qkv(7, batch=2, tokens=10)
    out = cb.consistent_attention(q2, k2, v2, 0.5, (ks, vs), attn)
    want = 0.5 * attn(q2, k2, v2) + 0.5 * attn(
        q2, torch.cat([k2, ks.expand(2, -1, -1)], 1), torch.cat([v2, vs.expand(2, -1, -1)], 1)
    )
    torch.testing.assert_close(out, want)
    assert cb.pool_bytes([(10, 8)], 3, 4, 0.5, 2, 4) == 2 * 15 * 8 * 3 * 2 * 4


def test_prompt_lines_go_to_their_batch_image():
    prompts = ["a cat"] * 4
    assert cb.prompts_with_lines(prompts, 2, "in a forest\non a beach\n\n") == [
        "a cat, in a forest", "a cat, on a beach", "a cat, in a forest", "a cat, on a beach",
    ]  # fmt: skip
    assert cb.prompts_with_lines(["x", "x", "x"], 3, "\nsecond") == ["x", "x, second", "x"]
    assert cb.prompts_with_lines(["", ""], 2, "alone") == ["alone", ""]
    assert cb.prompts_with_lines(["x"], 1, "") == ["x"]
    with pytest.raises(ArgumentError, match=r"refdrop\.prompt_lines.*batch size 2"):
        cb.prompts_with_lines(prompts, 2, "a\nb\nc")
