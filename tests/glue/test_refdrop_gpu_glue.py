"""Recordings kept in GPU memory: the adapter's choice (share of the GPU, what is already kept there), the library's
listing, and Record → Use through the patch with the recording kept where it was made."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lib_imgcond.host import forge as forge_host
from lib_imgcond.refdrop import forge_install, forge_library, forge_patch
from lib_imgcond.refdrop import forge_refdrop as host
from lib_imgcond.refdrop.reference import Reference
from tests.glue.fakes import FakeUnetPatcher, fake_p
from tests.glue.test_refdrop_glue import HEADS, VALUES, attn, qkv, run_pass

GIB = 2**30
CUDA0 = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _clean_library():
    forge_library.REFERENCES.clear()
    yield
    forge_library.REFERENCES.clear()


@pytest.fixture
def gpu(monkeypatch):
    """A 100 GiB GPU with `state.free` GiB free, 2 GiB of them cached by torch's allocator."""
    state = SimpleNamespace(free=80)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: ((state.free - 2) * GIB, 100 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * GIB)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return state


def kept(name: str, gib: int, device=CUDA0):
    """A library entry of `gib` GiB kept on `device` (only its device and size matter here)."""
    return SimpleNamespace(name=name, device=torch.device(device), nbytes=gib * GIB, family="sd15")


def test_gpu_for_counts_what_is_kept_and_the_free_memory(gpu):
    assert host.library.gpu_for("cuda", 20 * GIB, 0.25, "new") == CUDA0  # "cuda" is the current device
    forge_library.REFERENCES["a"] = kept("a", 10)
    forge_library.REFERENCES["on-cpu"] = kept("on-cpu", 50, "cpu")  # RAM references do not count
    assert host.library.gpu_for(CUDA0, 15 * GIB, 0.25, "new") == CUDA0
    assert host.library.gpu_for(CUDA0, 16 * GIB, 0.25, "new") is None  # 26 GiB kept: over the share
    assert host.library.gpu_for(CUDA0, 16 * GIB, 0.25, "a") == CUDA0  # it replaces 'a': 'a' is not counted
    gpu.free = 40
    assert host.library.gpu_for(CUDA0, 16 * GIB, 0.25, "a") is None  # would leave less than a quarter free
    assert host.library.gpu_for(CUDA0, 1 * GIB, 0.0, "new") is None  # share 0: always RAM
    assert host.library.gpu_for("cpu", 1 * GIB, 0.25, "new") is None
    assert host.library.gpu_for(None, 1 * GIB, 0.25, "new") is None


def test_plan_keeps_a_record_on_the_gpu_only_when_it_fits(gpu, monkeypatch):
    monkeypatch.setattr(forge_host, "load_device", lambda p: CUDA0)
    p = fake_p("sd15", width=64, height=64, sampler_name="Euler a", batch_size=1)
    job = host.plan(p, dict(VALUES, mode="Record"), 0, False, gpu_share=0.25)
    assert job.record.device == CUDA0
    assert host.plan(p, dict(VALUES, mode="Record"), 0, False).record.device is None  # the default share is 0
    gpu.free = 20
    assert host.plan(p, dict(VALUES, mode="Record"), 0, False, gpu_share=0.25).record.device is None


def test_load_device_reads_the_unet_patcher():
    unet = SimpleNamespace(load_device=CUDA0)
    p = SimpleNamespace(sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=unet)))
    assert forge_host.load_device(p) == CUDA0
    assert forge_host.load_device(SimpleNamespace()) is None


def test_the_library_says_a_reference_is_in_gpu_memory(monkeypatch, tmp_path):
    monkeypatch.setattr(host.library, "references_dir", lambda: str(tmp_path))
    forge_library.REFERENCES["g"] = Reference("g", "sd15", keep_on=CUDA0)
    forge_library.REFERENCES["r"] = Reference("r", "sd15")
    rows = {row["name"]: row for row in forge_library.describe()}
    assert rows["g"]["kept"] == "GPU" and rows["g"]["on_gpu"] and rows["g"]["in_ram"]
    assert rows["r"]["kept"] == "RAM" and not rows["r"]["on_gpu"]


def record_and_use(device: str, monkeypatch):
    """Record three steps with the recording kept on `device`, then Use it with the same K/V: the plain output."""
    from lib_imgcond.host import progress

    shown = []
    real_status = progress.status
    monkeypatch.setattr(progress, "status", lambda text: shown.append(text) or real_status(text))
    layers = frozenset(x[:3] for x in host.rd.layer_table("sd15"))
    job = host.Job({**VALUES, "mode": "Record"}, "sd15", layers)
    job.record = Reference("r", "sd15", {"trace": {}}, keep_on=device)
    unet, tracker = FakeUnetPatcher(), forge_patch.PassTracker("first", 3)
    tracker.schedule = [3.0, 2.0, 1.0, 0.0]
    forge_install.install(unet, job, tracker, attn)
    q, k, v = (t.to(device) for t in qkv(0))
    for sigma in (3.0, 2.0, 1.0):
        run_pass(unet, sigma, q, k, v)
    host.finish_record(job, {"first": tracker}, save_file=False)
    ref = forge_library.REFERENCES["r"]
    assert ref.device == torch.device(device) and not any("host memory" in s for s in shown)
    kr, vr = ref.get(("first", 2, "output", 3, 0))
    assert kr.device == torch.device(device) and torch.equal(kr, k[1:2]) and torch.equal(vr, v[1:2])
    use = host.Job(dict(VALUES), "sd15", layers, uses=[(ref, 0.7)])
    unet2, t2 = FakeUnetPatcher(), forge_patch.PassTracker("first", 3)
    t2.schedule = [3.0, 2.0, 1.0, 0.0]
    forge_install.install(unet2, use, t2, attn)
    for sigma in (3.0, 2.0, 1.0):
        assert torch.equal(run_pass(unet2, sigma, q, k, v), attn(q, k, v, HEADS))
    q2, k2, v2 = (t.to(device) for t in qkv(1))
    out = run_pass(unet2, 3.0, q2, k2, v2)
    assert not torch.equal(out, attn(q2, k2, v2, HEADS))  # another image's K/V: it blends


def test_record_then_use_with_the_recording_kept_where_it_was_made(monkeypatch):
    record_and_use("cpu", monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_record_then_use_with_the_recording_kept_on_the_gpu(monkeypatch):
    record_and_use("cuda:0", monkeypatch)
