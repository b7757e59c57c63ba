"""RefDrop fp8 storage: per-tensor scales, the round-trip error bound, files, the settings, the budget bytes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.refdrop import precision as prec
from lib_imgcond.refdrop.file_format import load_reference, save_reference
from lib_imgcond.refdrop.layers import layer_table
from lib_imgcond.refdrop.prefetch import Prefetcher
from lib_imgcond.refdrop.reference import Reference, RefKey

LIDS = layer_table("sd15")[:4]


def rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def bound(x: torch.Tensor, scale: float) -> torch.Tensor:
    """e4m3fn rounding: half an ulp of 3 mantissa bits (x/16) for normals, 2^-10·scale in the subnormal range."""
    return torch.maximum(x.abs() / 16, torch.full_like(x, scale * 2.0**-10)) * (1 + 1e-6)


def kv_items(seed=0, scale_k=3.0, scale_v=0.01):
    items = []
    for s in range(2):
        for i, lid in enumerate(LIDS):
            key = RefKey("first", s, lid.group, lid.block_id, lid.block_index)
            k = rand(1, 16, 40, seed=seed + 10 * s + i, scale=scale_k)
            v = rand(1, 16, 40, seed=-(seed + 10 * s + i) - 1, scale=scale_v)
            items.append((key, k, v))
    return items


@pytest.mark.parametrize("batched", [False, True])
def test_fp8_round_trip_within_the_e4m3_bound_with_separate_k_and_v_scales(batched):
    ref = Reference("r", "sd15", precision="fp8")
    items = kv_items()
    if batched:
        ref.put_many(items)
    else:
        for key, k, v in items:
            ref.put(key, k, v)
    ref.finalize()
    assert ref.meta["dtype"] == "float8_e4m3fn" and ref.meta["precision"] == "fp8"
    for key, k, v in items:
        sk, sv = ref.scale(key)
        assert sk == pytest.approx(float(k.abs().max()) / 448, rel=1e-6)
        assert sv == pytest.approx(float(v.abs().max()) / 448, rel=1e-6)  # V ~300x smaller: its own scale
        raw_k, _ = ref.get(key)
        assert raw_k.dtype == torch.float8_e4m3fn
        gk, gv = ref.get(key, device="cpu", dtype=torch.float32)
        assert gk.dtype == torch.float32
        assert ((gk - k).abs() <= bound(k, sk)).all()
        assert ((gv - v).abs() <= bound(v, sv)).all()
        # really quantised: e4m3 keeps 3 mantissa bits (errors up to 1/16 relative, >= 3% here), while a float32
        # round trip through the scale alone errs by ~1e-7 relative; 1e-3 separates the two
        assert (gk - k).abs().max() > k.abs().max() * 1e-3
    assert ref.nbytes == sum(2 * k.numel() for _, k, _ in items)  # one byte per element


def test_fp8_all_zero_tensor_keeps_scale_one_and_comes_back_zero():
    ref = Reference("z", "sd15", precision="fp8")
    key = RefKey("first", 0, *tuple(LIDS[0])[:3])
    ref.put(key, torch.zeros(1, 3, 8), rand(1, 3, 8, seed=1))
    assert ref.scale(key)[0] == 1.0
    gk, _ = ref.get(key, dtype=torch.float16)
    assert gk.dtype == torch.float16 and torch.equal(gk, torch.zeros(1, 3, 8, dtype=torch.float16))


def saved_fp8(tmp_path):
    """An fp8 reference and the file it was saved to."""
    ref = Reference("cat", "sd15", {"steps": {"first": 2}}, precision="fp8")
    ref.put_many(kv_items())
    ref.finalize()
    path = tmp_path / "cat.safetensors"
    save_reference(ref, path)
    return ref, path


def test_fp8_file_keeps_precision_and_scales(tmp_path):
    ref, path = saved_fp8(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("fp8_scales").shape == (len(ref), 2)
    assert meta["precision"] == "fp8" and meta["format_version"] == "2"
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k.endswith("/k")} == {"F8_E4M3"}
    back = load_reference(path, name="renamed")
    assert back.name == "renamed" and back.precision == "fp8"
    for key in ref:
        assert back.scale(key) == ref.scale(key)
        for a, b in zip(back.get(key, dtype=torch.float32), ref.get(key, dtype=torch.float32), strict=True):
            assert torch.equal(a, b)


def test_fp8_file_without_scales_is_refused(tmp_path):
    _ref, path = saved_fp8(tmp_path)
    # the same file with the scales tensor renamed away
    raw = path.read_bytes().replace(b'"fp8_scales"', b'"xx8_scales"')
    path.write_bytes(raw)
    with pytest.raises(ImgcondError, match="without their scales"):
        load_reference(path)


def test_fp16_and_fp32_files_stay_format_1(tmp_path):
    for precision in ("as computed", "fp16"):
        ref = Reference("c", "sd15", {"steps": {"first": 2}}, precision=precision)
        ref.put_many(kv_items())
        path = tmp_path / f"{precision}.safetensors"
        save_reference(ref, path)
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["format_version"] == "1"
        assert load_reference(path).precision == precision


def test_prefetcher_dequantises_to_the_compute_dtype():
    ref = Reference("r", "sd15", precision="fp8")
    items = kv_items()
    ref.put_many(items)
    pf = Prefetcher(ref, "cpu", torch.float16)
    key, _k, _v = items[3]
    gk, _gv = pf.get(key)
    assert gk.dtype == torch.float16
    assert torch.equal(gk, ref.get(key, dtype=torch.float16)[0])


def test_settings_honour_the_old_fp16_bool():
    assert prec.from_settings({}) == "as computed"
    assert prec.from_settings({"imgcond_refdrop_store_fp16": True}) == "fp16"
    assert prec.from_settings({"imgcond_refdrop_store_fp16": False}) == "as computed"
    explicit = {"imgcond_refdrop_store_fp16": True, "imgcond_refdrop_storage_precision": "as computed"}
    assert prec.from_settings(explicit) == "as computed"  # a choice made since wins
    assert prec.from_settings({"imgcond_refdrop_storage_precision": "fp8"}) == "fp8"
    with pytest.raises(ArgumentError, match="storage precision"):
        prec.check_precision("int4")
    assert Reference("r", "sd15", store_fp16=True).precision == "fp16"
    assert [prec.BYTES[p] for p in prec.PRECISIONS] == [4, 2, 1]
