"""A recording kept in GPU memory (`Reference(keep_on=device)`): what decides it, and that it loses nothing."""

from __future__ import annotations

import pytest
import torch

from lib_imgcond.common.errors import ArgumentError
from lib_imgcond.refdrop import precision as prec
from lib_imgcond.refdrop.checks import fits_on_device
from lib_imgcond.refdrop.file_format import load_reference, save_reference
from lib_imgcond.refdrop.reference import Reference, RefKey

GIB = 2**30
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    ("needed", "held", "free", "share", "fits"),
    [
        (8, 0, 100, 0.25, True),  # 8 of a 100 GiB GPU
        (8, 17, 100, 0.25, True),  # 25 GiB kept together: exactly the share
        (8, 18, 100, 0.25, False),  # the share is used up by earlier recordings
        (30, 0, 100, 0.25, False),  # alone larger than the share
        (8, 0, 33, 0.25, True),  # 25 GiB still free afterwards
        (8, 0, 32, 0.25, False),  # less than a quarter left free
        (8, 0, 100, 0.0, False),  # 0: always RAM
        (0, 0, 100, 0.25, False),  # nothing to keep
    ],
)
def test_fits_on_device(needed, held, free, share, fits):
    assert fits_on_device(needed * GIB, held * GIB, free * GIB, 100 * GIB, share) is fits


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_fits_on_device_names_a_bad_share(share):
    with pytest.raises(ArgumentError, match="RefDrop GPU share"):
        fits_on_device(1, 0, 10, 10, share)


def items(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = (("input", 1, 0, 320), ("middle", 0, 0, 1280), ("output", 11, 0, 320))
    out = []
    for step in range(2):
        for group, block, index, ch in layers:
            k, v = (torch.randn(1, 6, ch, generator=g).to(device) for _ in range(2))
            out.append((RefKey("first", step, group, block, index), k, v))
    return out


def test_kept_on_its_device_the_gather_is_the_only_copy(monkeypatch):
    kept = Reference("k", "sd15", keep_on="cpu")

    def no_host_buffer(*_a, **_k):
        raise AssertionError("a recording kept where it was recorded needs no host buffer")

    monkeypatch.setattr(kept._arena, "empty", no_host_buffer)
    recorded = items()
    assert kept.put_many(recorded[:3]) + kept.put_many(recorded[3:]) == sum(2 * k.numel() * 4 for _, k, _ in recorded)
    kept.finalize()
    assert kept.device == torch.device("cpu") and len(kept) == 6 and kept.steps("first") == 2
    for key, k, v in recorded:
        kk, vk = kept.get(key)
        assert torch.equal(kk, k) and torch.equal(vk, v)
    assert Reference("r", "sd15").device is None  # the default: host memory


@pytest.mark.parametrize("precision", [prec.AS_COMPUTED, prec.FP16, prec.FP8])
def test_a_kept_reference_equals_a_host_one_and_saves_the_same(tmp_path, precision):
    recorded = items(seed=1)
    kept, host = Reference("k", "sd15", precision=precision, keep_on="cpu"), Reference("h", "sd15", precision=precision)
    for ref in (kept, host):
        ref.put_many(recorded)
        ref.finalize()
    save_reference(kept, tmp_path / "k.safetensors")
    loaded = load_reference(tmp_path / "k.safetensors")
    assert loaded.device is None  # a file loads into RAM
    for key, _k, _v in recorded:
        for a, b, c in zip(kept.get(key), host.get(key), loaded.get(key), strict=True):
            assert a.dtype == b.dtype == c.dtype and torch.equal(a.float(), b.float()) and torch.equal(a, c)
        assert kept.scale(key) == host.scale(key) == loaded.scale(key)


@CUDA
def test_cuda_kept_recording_stays_on_the_gpu_and_use_reads_it_in_place(tmp_path):
    from lib_imgcond.refdrop.source import ReferenceSource

    ref = Reference("g", "sd15", keep_on="cuda:0")
    recorded = items("cuda", seed=2)
    ref.put_many(recorded)
    ref.finalize()
    assert not ref._unsynced and not ref._staged and not ref._mappings  # nothing went to the host
    order = sorted({key.layer for key, _, _ in recorded})
    source = ReferenceSource([(ref, 0.5)], order)
    source.prepare([(0, "first", 0, 1, 0.5)], torch.device("cuda:0"), torch.float32)
    for key, k, v in recorded:
        kk, vk = ref.get(key)
        assert kk.is_cuda and torch.equal(kk, k) and torch.equal(vk, v)
        sk, sv = source.get(0, "first", key.step, key.layer)
        assert sk.data_ptr() == kk.data_ptr() and sv.data_ptr() == vk.data_ptr()  # no upload, no copy
    half = ReferenceSource([(ref, 0.5)], order)  # another computation dtype: cast on the device, once per pass
    half.prepare([(0, "first", 0, 1, 0.5)], torch.device("cuda:0"), torch.float16)
    key, k, _v = recorded[-1]
    hk, _ = half.get(0, "first", key.step, key.layer)
    assert hk.dtype == torch.float16 and torch.equal(hk, k.half())
    torch.cuda.synchronize()
    save_reference(ref, tmp_path / "g.safetensors")
    loaded = load_reference(tmp_path / "g.safetensors")
    for key, k, v in recorded:
        assert torch.equal(loaded.get(key)[0], k.cpu()) and torch.equal(loaded.get(key)[1], v.cpu())


@CUDA
@pytest.mark.parametrize("precision", [prec.FP16, prec.FP8])
def test_cuda_kept_recording_in_a_smaller_precision_equals_a_ram_one(precision):
    recorded = items("cuda", seed=3)
    kept = Reference("k", "sd15", precision=precision, keep_on="cuda:0")
    host = Reference("h", "sd15", precision=precision)
    for ref in (kept, host):
        ref.put_many(recorded)
        ref.finalize()
    for key, _k, _v in recorded:
        assert kept.scale(key) == host.scale(key)  # fp8: the scales reached the host before they are read
        for a, b in zip(kept.get(key), host.get(key), strict=True):
            assert a.is_cuda and a.dtype == b.dtype and torch.equal(a.cpu(), b)
