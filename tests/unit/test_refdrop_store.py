"""RefDrop K/V store: put/get, file round trip, validation, budget, compatibility, prefetcher."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.memory.arena import format_bytes
from lib_imgcond.refdrop.checks import check_budget, check_compatible, check_shapes, estimate_bytes
from lib_imgcond.refdrop.file_format import FORMAT, load_reference, reference_info, save_reference
from lib_imgcond.refdrop.layers import layer_table, parse_layers
from lib_imgcond.refdrop.prefetch import Prefetcher
from lib_imgcond.refdrop.reference import Reference, RefKey


def rand(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def make_ref(name="cat", family="sd15", passes=("first",), steps=3, dtype=torch.float16, layers=None) -> Reference:
    """A small synthetic reference: (1, tokens, channels) K/V per key."""
    ref = Reference(name, family, {"width": 64, "height": 48, "steps": {p: steps for p in passes}})
    layers = layers if layers is not None else layer_table(family)[:3] + layer_table(family)[-2:]
    seed = 0
    for p in passes:
        for s in range(steps):
            for lid in layers:
                seed += 1
                k, v = rand(1, 5, 8, seed=seed, dtype=dtype), rand(1, 5, 8, seed=-seed, dtype=dtype)
                ref.put(RefKey(p, s, lid.group, lid.block_id, lid.block_index), k, v)
    ref.finalize()
    return ref


def assert_same(a: Reference, b: Reference) -> None:
    assert set(a.keys()) == set(b.keys())
    for key in a:
        ka, va = a.get(key)
        kb, vb = b.get(key)
        assert torch.equal(ka, kb)
        assert torch.equal(va, vb)
        assert ka.dtype == kb.dtype


# --- put / get ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_put_get_exact_in_source_dtype(dtype):
    ref = Reference("r", "sdxl")
    key = RefKey("first", 0, "output", 3, 1)
    k, v = rand(2, 7, 640, seed=1, dtype=dtype), rand(2, 7, 640, seed=2, dtype=dtype)
    ref.put(key, k, v)
    gk, gv = ref.get(key)
    assert gk.dtype == dtype
    assert torch.equal(gk, k)
    assert torch.equal(gv, v)
    assert gk.data_ptr() != k.data_ptr()  # a copy, not the caller's tensor
    assert len(ref) == 1
    assert ref.nbytes == 2 * k.numel() * k.element_size()
    ck, _ = ref.get(key, dtype=torch.float64)
    assert ck.dtype == torch.float64


def test_put_reuses_buffer_and_overwrites():
    ref = Reference("r", "sd15")
    key = RefKey("first", 1, "middle", 0, 0)
    ref.put(key, rand(1, 4, 1280, seed=1), rand(1, 4, 1280, seed=2))
    ptr = ref.get(key)[0].data_ptr()
    k2 = rand(1, 4, 1280, seed=3)
    ref.put(key, k2, k2)
    assert ref.get(key)[0].data_ptr() == ptr
    assert torch.equal(ref.get(key)[0], k2)


def test_put_inside_inference_mode():
    ref = Reference("r", "sd15")
    key = RefKey("first", 0, "input", 1, 0)
    with torch.inference_mode():
        k = rand(1, 4, 320, seed=1) * 1
        ref.put(key, k, k)
    k2 = rand(1, 4, 320, seed=2)
    ref.put(key, k2, k2)  # outside inference mode the same buffer is still writable
    assert torch.equal(ref.get(key)[1], k2)


def test_fp16_storage_option():
    ref = Reference("r", "sd15", store_fp16=True)
    k32 = rand(1, 6, 320, seed=1)
    ref.put(RefKey("first", 0, "input", 1, 0), k32, k32)
    kb = rand(1, 6, 320, seed=2, dtype=torch.bfloat16)
    ref.put(RefKey("first", 0, "input", 2, 0), kb, kb)
    k, _ = ref.get(RefKey("first", 0, "input", 1, 0))
    assert k.dtype == torch.float16
    assert torch.equal(k, k32.half())
    assert ref.get(RefKey("first", 0, "input", 2, 0))[0].dtype == torch.bfloat16  # only fp32 is narrowed
    ref.finalize()
    assert ref.meta["dtype"] == "float16"


def test_put_validation():
    ref = Reference("r", "sd15")
    t = rand(1, 2, 320, seed=1)
    with pytest.raises(ArgumentError, match="pass_name"):
        ref.put(RefKey("second", 0, "input", 1, 0), t, t)
    with pytest.raises(ImgcondError, match="transformer block"):
        ref.put(RefKey("first", 0, "input", 3, 0), t, t)
    with pytest.raises(ImgcondError, match="K and V"):
        ref.put(RefKey("first", 0, "input", 1, 0), t, t[:, :1])
    with pytest.raises(ImgcondError, match="no K/V"):
        ref.get(RefKey("first", 0, "input", 1, 0))
    with pytest.raises(ArgumentError, match="source"):
        Reference("r", "sd15", {"source": "camera"})


def test_queries():
    ref = make_ref(passes=("first", "hires"), steps=4)
    assert ref.has_pass("first")
    assert ref.has_pass("hires")
    assert ref.steps("first") == 4
    assert not Reference("e", "sd15").has_pass("first")
    assert Reference("e", "sd15").steps("first") == 0
    table = layer_table("sd15")
    assert ref.layers() == {(x.group, x.block_id, x.block_index) for x in table[:3] + table[-2:]}
    assert ref.meta["layers"][0] == ["input", 1, 0]
    assert ref.meta["layers"][-1] == ["output", 11, 0]
    assert len(ref) == 2 * 4 * 5
    assert ref.channels(("output", 11, 0)) == 8


def test_steps_inferred_without_meta():
    ref = Reference("r", "sd15")
    t = rand(1, 2, 320, seed=1)
    ref.put(RefKey("first", 6, "input", 1, 0), t, t)
    assert ref.steps("first") == 7


# --- budget ---------------------------------------------------------------------------------------


def test_estimate_bytes():
    assert (
        estimate_bytes([(4096, 320), (64, 1280)], steps=20, batch_rows=1, bytes_per_el=2)
        == 2 * (4096 * 320 + 64 * 1280) * 20 * 2
    )
    assert estimate_bytes([], 20, 1, 2) == 0
    assert estimate_bytes([(10, 3)], 2, 3, 4) == 2 * 30 * 2 * 3 * 4


def test_check_budget():
    check_budget(10 * 2**30, 0)  # unlimited
    check_budget(2**30, 2**30)
    with pytest.raises(ImgcondError) as e:
        check_budget(int(15.6 * 2**30), 8 * 2**30)
    msg = str(e.value)
    assert "needs 15.60 GiB" in msg
    assert "budget is 8.00 GiB" in msg
    assert "Settings → ImgCond" in msg
    assert "fewer layers/steps" in msg
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**20) == "3.00 MiB"


# --- files ------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    ref = make_ref(passes=("first", "hires"), dtype=torch.bfloat16)
    ref.meta["source"] = "image"
    path = tmp_path / "refs" / "cat.safetensors"
    save_reference(ref, path)
    assert sorted(os.listdir(tmp_path / "refs")) == ["cat.safetensors"]  # temp file gone
    back = load_reference(path)
    assert_same(ref, back)
    assert (back.name, back.family) == ("cat", "sd15")
    for field in ("width", "height", "steps", "dtype", "layers", "created", "source"):
        assert back.meta[field] == ref.meta[field], field
    assert back.meta["steps"] == {"first": 3, "hires": 3}
    assert back.meta["dtype"] == "bfloat16"


def test_file_layout(tmp_path):
    ref = make_ref(steps=2)
    path = tmp_path / "cat.safetensors"
    save_reference(ref, path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    assert meta["format"] == FORMAT
    assert meta["format_version"] == "1"
    assert meta["family"] == "sd15"
    assert meta["name"] == "cat"
    assert json.loads(meta["steps"]) == {"first": 2}
    assert (meta["width"], meta["height"], meta["dtype"], meta["layer_count"]) == ("64", "48", "float16", "5")
    keys = json.loads(meta["keys"])
    assert keys[0] == ["first", 0, "input", 1, 0]
    assert len(keys) == 10
    assert "first/1/output/11/0/k" in names
    assert "first/1/output/11/0/v" in names
    assert len(names) == 20


def test_save_empty_reference_fails(tmp_path):
    with pytest.raises(ImgcondError, match="empty"):
        save_reference(Reference("e", "sd15"), tmp_path / "e.safetensors")


def test_overwrite_existing_file(tmp_path):
    path = tmp_path / "cat.safetensors"
    save_reference(make_ref(steps=1), path)
    save_reference(make_ref(steps=2), path)
    assert load_reference(path).steps("first") == 2


def test_truncated_and_garbage_files(tmp_path):
    path = tmp_path / "cat.safetensors"
    save_reference(make_ref(), path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImgcondError, match=r"cut\.safetensors.*record it again"):
        load_reference(cut)
    with pytest.raises(ImgcondError, match="record it again"):
        reference_info(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(ImgcondError, match=r"junk\.safetensors.*record it again"):
        load_reference(junk)
    with pytest.raises(ImgcondError, match="does not exist"):
        load_reference(tmp_path / "missing.safetensors")


def test_wrong_format_metadata(tmp_path):
    other = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ImgcondError, match="is not an imgcond RefDrop reference"):
        load_reference(other)
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(ImgcondError, match="is not an imgcond RefDrop reference"):
        reference_info(bare)


def _rewrite(src, dst, meta_changes=None, drop=None):
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {n: f.get_tensor(n) for n in set(f.keys()) - {drop}}
    meta.update(meta_changes or {})
    save_file(tensors, str(dst), metadata=meta)


def test_version_and_missing_tensor(tmp_path):
    path = tmp_path / "cat.safetensors"
    save_reference(make_ref(), path)
    newer = tmp_path / "newer.safetensors"
    _rewrite(path, newer, {"format_version": "3"})
    with pytest.raises(ImgcondError, match=r"format 3.*update"):
        load_reference(newer)
    holey = tmp_path / "holey.safetensors"
    _rewrite(path, holey, drop="first/2/output/10/0/v")
    with pytest.raises(ImgcondError, match=r"first/2/output/10/0 missing.*record it again"):
        load_reference(holey)
    mismatch = tmp_path / "mismatch.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {n: f.get_tensor(n) for n in set(f.keys())}
    tensors["first/0/input/1/0/v"] = tensors["first/0/input/1/0/v"][:, :2].contiguous()
    save_file(tensors, str(mismatch), metadata=meta)
    with pytest.raises(ImgcondError, match="shapes"):
        load_reference(mismatch)
    badjson = tmp_path / "badjson.safetensors"
    _rewrite(path, badjson, {"keys": "[not json"})
    with pytest.raises(ImgcondError, match="record it again"):
        load_reference(badjson)


def test_reference_info(tmp_path):
    path = tmp_path / "cat.safetensors"
    save_reference(make_ref(passes=("first", "hires"), steps=2), path)
    info = reference_info(path)
    assert info["name"] == "cat"
    assert info["family"] == "sd15"
    assert info["size_bytes"] == os.path.getsize(path)
    assert info["steps"] == {"first": 2, "hires": 2}
    assert (info["width"], info["height"], info["resolution"]) == (64, 48, "64×48")
    assert info["layer_count"] == 5


# --- compatibility ------------------------------------------------------------------------------------


def test_check_compatible_messages():
    ref = make_ref(layers=list(parse_layers("output:0-2, middle", "sd15")))
    wanted = parse_layers("output:0-1", "sd15")
    check_compatible(ref, "sd15", wanted, {"first"})
    with pytest.raises(ImgcondError, match="reference 'cat' was recorded on sd15 but the loaded model is sdxl"):
        check_compatible(ref, "sdxl", wanted, {"first"})
    with pytest.raises(ImgcondError, match="no hires-pass K/V: record it with hires fix enabled"):
        check_compatible(ref, "sd15", wanted, {"first", "hires"})
    with pytest.raises(ImgcondError, match=r"layers output:3-4 were not recorded in 'cat'.*middle, output:0-2"):
        check_compatible(ref, "sd15", parse_layers("output:1-4", "sd15"), {"first"})
    check_compatible(ref, "sd15", {("output", 3, 0)}, {"first"})  # plain triples work too
    with pytest.raises(ImgcondError, match="no first-pass"):
        check_compatible(make_ref(passes=("hires",)), "sd15", set(), {"first"})


def test_check_shapes():
    ref = make_ref()
    check_shapes(ref, ("input", 1, 0), 8)
    check_shapes(ref, ("middle", 0, 0), 1280)  # not recorded: nothing to compare
    with pytest.raises(ImgcondError, match="has 8 channels at input:0 but the loaded model has 320"):
        check_shapes(ref, layer_table("sd15")[0], 320)


# --- prefetcher --------------------------------------------------------------------------------------


def test_prefetcher_cpu_caches_current_step():
    ref = make_ref(steps=3)
    pf = Prefetcher(ref, "cpu", torch.float32)
    keys0 = [k for k in ref if k.step == 0]
    pf.fetch(keys0)  # no-op on CPU
    k, _v = pf.get(keys0[0])
    assert k.dtype == torch.float32
    assert torch.equal(k, ref.get(keys0[0])[0].float())
    assert pf.get(keys0[0])[0] is k  # converted once per step
    key1 = next(k for k in ref if k.step == 1)
    pf.get(key1)
    assert list(pf._steps) == [("first", 1)]  # the earlier step was dropped
    with pytest.raises(ImgcondError):
        pf.get(RefKey("first", 9, "middle", 0, 0))


def test_prefetcher_same_dtype_returns_store_tensors():
    ref = make_ref(steps=1)
    key = next(iter(ref.keys()))
    assert Prefetcher(ref, "cpu", torch.float16).get(key)[0] is ref.get(key)[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_put_prefetch_round_trip():
    ref = Reference("g", "sd15", store_fp16=True)
    key = RefKey("first", 0, "input", 1, 0)
    k = torch.randn(1, 64, 320, device="cuda")
    ref.put(key, k, k * 2)
    ref.finalize()
    assert ref.get(key)[0].is_pinned()
    assert torch.equal(ref.get(key)[0], k.half().cpu())
    pf = Prefetcher(ref, "cuda", torch.float16)
    pf.fetch([key])
    gk, gv = pf.get(key)
    assert gk.is_cuda
    assert torch.equal(gv, (k * 2).half())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_put_many_is_page_locked_after_the_recording():
    import gc

    from lib_imgcond.memory import host_blocks

    ref = Reference("g", "sdxl")
    key = RefKey("first", 0, "input", 4, 0)
    k = torch.randn(1, 4096, 640, device="cuda")  # 2 × 10 MiB in fp32: a mapped block
    ref.put_many([(key, k, k * 2)])
    ref.finalize()
    host_blocks.idle()
    kr, vr = ref.get(key)
    assert kr.is_pinned() and torch.equal(kr, k.cpu()) and torch.equal(vr, (k * 2).cpu())
    locked = host_blocks.locked_bytes()
    del ref, kr, vr
    gc.collect()
    assert host_blocks.locked_bytes() <= locked - 2 * k.numel() * 4


def test_put_many_matches_put_exactly():
    import torch as t

    from lib_imgcond.refdrop.reference import Reference

    g = t.Generator().manual_seed(3)
    items = [
        (("first", 0, "input", 1, 0), t.randn(1, 6, 8, generator=g), t.randn(1, 6, 8, generator=g)),
        (("first", 0, "middle", 0, 0), t.randn(1, 2, 16, generator=g), t.randn(1, 2, 16, generator=g)),
        (("first_uncond", 1, "output", 11, 0), t.randn(1, 6, 8, generator=g), t.randn(1, 6, 8, generator=g)),
    ]
    a, b = Reference("a", "sd15"), Reference("b", "sd15", store_fp16=True)
    added = a.put_many(items)
    assert added == sum(2 * k.numel() * 4 for _, k, _ in items)
    b.put_many(items)
    for key, k, v in items:
        ka, va = a.get(key)
        assert t.equal(ka, k) and t.equal(va, v)
        assert b.get(key)[0].dtype == t.float16
    assert a.steps("first") == 1 and a.steps("first_uncond") == 2 and a.channels(("middle", 0, 0)) == 16
