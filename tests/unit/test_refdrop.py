"""RefDrop attention blend, layer addressing and step mapping."""

from __future__ import annotations

import math

import pytest
import torch

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.refdrop.layers import (
    LayerId,
    format_layers,
    layer_of,
    layer_shape,
    layer_table,
    map_step,
    parse_layers,
    rfg_attention,
    sdpa,
    step_in_window,
)

HEADS, D = 4, 8


def rand(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture
def qkv():
    b, n, c = 2, 16, HEADS * D
    return [rand(b, n, c, seed=i) for i in range(5)]  # q, k, v, k_ref, v_ref


def manual_attention(q, k, v, heads):
    """softmax(q kᵀ/√d) v per head, written out by hand."""
    b, n, c = q.shape
    d = c // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2)
    kh = k.reshape(k.shape[0], k.shape[1], heads, d).transpose(1, 2)
    vh = v.reshape(v.shape[0], v.shape[1], heads, d).transpose(1, 2)
    w = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ vh).transpose(1, 2).reshape(b, n, c)


# --- §1.9 (1): blend -------------------------------------------------------------------------


def test_c_zero_is_exactly_base(qkv):
    q, k, v, kr, vr = qkv
    calls = []

    def attn(*a):
        calls.append(a)
        return sdpa(*a)

    out = rfg_attention(q, k, v, [(kr, vr, 0.0)], attn, HEADS)
    assert torch.equal(out, sdpa(q, k, v, HEADS))
    assert len(calls) == 1
    assert torch.equal(rfg_attention(q, k, v, [], sdpa, HEADS), sdpa(q, k, v, HEADS))


def test_c_one_is_reference(qkv):
    q, k, v, kr, vr = qkv
    out = rfg_attention(q, k, v, [(kr, vr, 1.0)], sdpa, HEADS)
    torch.testing.assert_close(out, sdpa(q, kr, vr, HEADS), atol=1e-6, rtol=0)


def test_negative_c_and_linearity(qkv):
    q, k, v, kr, vr = qkv
    a, b = sdpa(q, k, v, HEADS), sdpa(q, kr, vr, HEADS)
    out = rfg_attention(q, k, v, [(kr, vr, -0.3)], sdpa, HEADS)
    torch.testing.assert_close(out, 1.3 * a - 0.3 * b, atol=1e-6, rtol=0)
    lo, mid, hi = (rfg_attention(q, k, v, [(kr, vr, c)], sdpa, HEADS) for c in (-0.5, 0.0, 0.5))
    torch.testing.assert_close(lo - 2 * mid + hi, torch.zeros_like(mid), atol=1e-6, rtol=0)


def test_multi_reference_formula(qkv):
    q, k, v, k1, v1 = qkv
    k2, v2 = rand(1, 40, HEADS * D, seed=7), rand(1, 40, HEADS * D, seed=8)
    out = rfg_attention(q, k, v, [(k1, v1, 0.2), (k2, v2, -0.1), (k1, v1, 0.0)], sdpa, HEADS)
    want = (
        0.9 * sdpa(q, k, v, HEADS)
        + 0.2 * sdpa(q, k1, v1, HEADS)
        - 0.1 * sdpa(q, k2.expand(2, -1, -1), v2.expand(2, -1, -1), HEADS)
    )
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


def test_batch_one_reference_is_expanded_not_copied(qkv):
    q, k, v, _, _ = qkv
    kr, vr = rand(1, 16, HEADS * D, seed=11), rand(1, 16, HEADS * D, seed=12)
    seen = []

    def attn(q_, k_, v_, heads):
        seen.append(k_)
        return sdpa(q_, k_, v_, heads)

    out = rfg_attention(q, k, v, [(kr, vr, 1.0)], attn, HEADS)
    assert seen[1].shape[0] == 2
    assert seen[1].stride(0) == 0
    for i in range(2):
        torch.testing.assert_close(out[i : i + 1], sdpa(q[i : i + 1], kr, vr, HEADS), atol=1e-6, rtol=0)


def test_reference_cast_to_query_dtype(qkv):
    q, k, v, kr, vr = qkv
    out = rfg_attention(q, k, v, [(kr.half(), vr.half(), 1.0)], sdpa, HEADS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sdpa(q, kr.half().float(), vr.half().float(), HEADS), atol=1e-6, rtol=0)


def test_reference_shape_errors(qkv):
    q, k, v, _, _ = qkv
    with pytest.raises(ImgcondError, match="different model architecture"):
        rfg_attention(q, k, v, [(rand(1, 8, 16, seed=1), rand(1, 8, 16, seed=2), 0.5)], sdpa, HEADS)
    with pytest.raises(ImgcondError, match="batch 3"):
        rfg_attention(q, k, v, [(rand(3, 8, 32, seed=1), rand(3, 8, 32, seed=2), 0.5)], sdpa, HEADS)


# --- §1.9 (2) and (3): identities -----------------------------------------------------------------


def test_concatenated_attention_identity():
    b, n, n1, c = 2, 12, 20, HEADS * D
    q, k, v = (rand(b, n, c, seed=i, dtype=torch.float64) for i in (1, 2, 3))
    k1, v1 = (rand(b, n1, c, seed=i, dtype=torch.float64) for i in (4, 5))
    cat = sdpa(q, torch.cat([k, k1], 1), torch.cat([v, v1], 1), HEADS)
    a, bb = sdpa(q, k, v, HEADS), sdpa(q, k1, v1, HEADS)

    def partition(kk):  # Z per (batch, head, query): Σ_k exp(q·k/√d)
        qh = q.reshape(b, n, HEADS, D).transpose(1, 2)
        kh = kk.reshape(b, -1, HEADS, D).transpose(1, 2)
        return torch.exp(qh @ kh.transpose(-1, -2) / math.sqrt(D)).sum(-1)

    z, z1 = partition(k), partition(k1)
    lam = (z / (z + z1)).transpose(1, 2).unsqueeze(-1)  # (b, n, heads, 1)
    want = lam * a.reshape(b, n, HEADS, D) + (1 - lam) * bb.reshape(b, n, HEADS, D)
    torch.testing.assert_close(cat, want.reshape(b, n, c), atol=1e-10, rtol=0)


def test_resolution_independence():
    q = rand(2, 24, HEADS * D, seed=1)
    kr, vr = rand(2, 96, HEADS * D, seed=2), rand(2, 96, HEADS * D, seed=3)
    out = rfg_attention(q, q, q, [(kr, vr, 1.0)], sdpa, HEADS)
    assert out.shape == (2, 24, HEADS * D)
    torch.testing.assert_close(out, manual_attention(q, kr, vr, HEADS), atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa(q, kr, vr, HEADS), manual_attention(q, kr, vr, HEADS), atol=1e-5, rtol=0)


# --- layer tables -----------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "sizes"), [("sd15", (6, 1, 9)), ("sdxl", (24, 10, 36))])
def test_layer_table_sizes(family, sizes):
    table = layer_table(family)
    assert len(table) == sum(sizes)
    groups = [lid.group for lid in table]
    assert groups == ["input"] * sizes[0] + ["middle"] * sizes[1] + ["output"] * sizes[2]
    for group, size in zip(("input", "middle", "output"), sizes, strict=True):
        assert [lid.index for lid in table if lid.group == group] == list(range(size))
    assert len({(lid.group, lid.block_id, lid.block_index) for lid in table}) == len(table)


def test_layer_table_contents():
    sd15 = layer_table("sd15")
    assert [lid.block_id for lid in sd15 if lid.group == "input"] == [1, 2, 4, 5, 7, 8]
    assert [lid.block_id for lid in sd15 if lid.group == "output"] == list(range(3, 12))
    sdxl = layer_table("sdxl")
    assert sdxl[0] == LayerId("input", 4, 0, 0)
    assert sdxl[4] == LayerId("input", 7, 0, 4)
    assert sdxl[23] == LayerId("input", 8, 9, 23)
    assert layer_of("sdxl", ("output", 3), 0) == LayerId("output", 3, 0, 30)
    assert layer_of("sdxl", ("middle", 0), 9) == LayerId("middle", 0, 9, 9)
    assert layer_of("sd15", ("output", 11), 0) == LayerId("output", 11, 0, 8)
    assert layer_of("sd15", ("input", 3), 0) is None
    assert layer_of("sd15", ("last", 0), 0) is None


def test_unknown_family():
    with pytest.raises(ImgcondError, match="flux"):
        layer_table("flux")
    with pytest.raises(ImgcondError):
        parse_layers("all", "sd2")


def test_layer_shape_matches_memory_notes():
    # forge-api C: SD1.5@512 ≈ 23 M elements (K+V) per step; SDXL@1024 ≈ 210 M
    sd15 = sum(t * c for t, c in (layer_shape("sd15", lid, 512, 512) for lid in layer_table("sd15")))
    sdxl = sum(t * c for t, c in (layer_shape("sdxl", lid, 1024, 1024) for lid in layer_table("sdxl")))
    assert 2 * sd15 == 23_101_440
    assert 2 * sdxl == 209_715_200
    assert layer_shape("sd15", ("middle", 0, 0), 520, 512) == (9 * 8, 1280)


# --- parse / format -----------------------------------------------------------------------------


def names(sel):
    return sorted((lid.group, lid.index) for lid in sel)


def test_parse_layers_forms():
    assert parse_layers("", "sd15") == frozenset(layer_table("sd15"))
    assert parse_layers("all", "sdxl") == frozenset(layer_table("sdxl"))
    assert parse_layers(" input, middle , output ", "sd15") == frozenset(layer_table("sd15"))
    assert names(parse_layers("output:0-5, middle", "sd15")) == [("middle", 0)] + [("output", i) for i in range(6)]
    assert names(parse_layers("input:0,2,4-6", "sdxl")) == [("input", i) for i in (0, 2, 4, 5, 6)]
    assert names(parse_layers("Input: 1 - 2; output:8", "sd15")) == [("input", 1), ("input", 2), ("output", 8)]
    assert parse_layers("none", "sd15") == frozenset()


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("output:9", r"output:9.*indices 0–8 for output on sd15"),
        ("middle:1", r"middle:1.*indices 0–0"),
        ("inptu", r"'inptu'.*input 0–5, middle 0–0, output 0–8"),
        ("3", r"'3'"),
        ("output:", r"'output:'"),
        ("output:a", r"'output:a'"),
        ("output:5-2", r"output:5-2"),
    ],
)
def test_parse_layers_errors(spec, match):
    with pytest.raises(ArgumentError, match=match):
        parse_layers(spec, "sd15")


def test_parse_layers_error_range_is_per_family():
    with pytest.raises(ArgumentError, match=r"indices 0–35 for output on sdxl"):
        parse_layers("output:36", "sdxl")


@pytest.mark.parametrize(
    ("family", "spec", "canonical"),
    [
        ("sd15", "", "all"),
        ("sd15", "output, middle, input", "all"),
        ("sd15", "output:0-5, middle", "middle, output:0-5"),
        ("sdxl", "input:0,2,4-6, output", "input:0,2,4-6, output"),
        ("sdxl", "middle:9, output:35,0-29", "middle:9, output:0-29,35"),
        ("sdxl", "input:0-23", "input"),
        ("sd15", "none", "none"),
    ],
)
def test_format_round_trip(family, spec, canonical):
    sel = parse_layers(spec, family)
    assert format_layers(sel, family) == canonical
    assert parse_layers(canonical, family) == sel


def test_format_accepts_triples_and_rejects_foreign_layers():
    assert format_layers({("output", 3, 0)}, "sd15") == "output:0"
    with pytest.raises(ImgcondError):
        format_layers({("output", 3, 1)}, "sd15")


# --- steps ------------------------------------------------------------------------------------


def test_map_step():
    assert map_step(0, 30, 20) == 0
    assert map_step(29, 30, 20) == 19
    assert [map_step(i, 20, 20) for i in range(20)] == list(range(20))
    assert [map_step(i, 5, 9) for i in range(5)] == [0, 2, 4, 6, 8]
    assert [map_step(i, 3, 2) for i in range(3)] == [0, 1, 1]  # 0.5 rounds up
    assert map_step(0, 1, 20) == 0
    assert map_step(7, 10, 1) == 0
    assert map_step(15, 10, 5) == 4  # overrun is clamped
    assert map_step(-2, 10, 5) == 0
    with pytest.raises(ArgumentError):
        map_step(0, 0, 5)


def test_step_in_window():
    assert [step_in_window(i, 10, 0.0, 1.0) for i in range(10)] == [True] * 10
    assert [i for i in range(10) if step_in_window(i, 10, 0.3, 0.6)] == [3, 4, 5]
    assert [i for i in range(10) if step_in_window(i, 10, 0.5, 1.0)] == [5, 6, 7, 8, 9]
    assert step_in_window(10, 10, 0.5, 1.0)  # a second-order overrun stays inside an open-ended window
    assert not step_in_window(9, 10, 0.0, 0.9)
    assert not step_in_window(0, 1, 0.5, 1.0)
    assert [i for i in range(3) if step_in_window(i, 3, 0.0, 0.0)] == []
    with pytest.raises(ArgumentError):
        step_in_window(0, 10, -0.1, 1.0)
    with pytest.raises(ArgumentError):
        step_in_window(0, 0, 0.0, 1.0)
