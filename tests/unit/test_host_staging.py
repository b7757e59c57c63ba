"""The staging ring: chunked copies through a few slots on worker threads, both ways; errors surfaced; bounded."""

from __future__ import annotations

import pytest
import torch

from lib_imgcond.memory.host_staging import StagingRing


@pytest.fixture
def ring():
    return StagingRing(slots=2, slot_bytes=96, workers=2, pin=False)


@pytest.mark.parametrize("numel", [1, 47, 48, 1000])
def test_to_host_copies_every_byte_through_small_slots(ring, numel):
    src = torch.randn(numel).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ring.to_host(src, dst)
    ring.drain()
    assert torch.equal(dst, src)
    assert len(ring._slots) == 2 and ring._free.qsize() == 2  # every slot back, none added


def test_many_copies_in_flight_land_in_their_own_blocks(ring):
    srcs = [torch.full((300,), float(i)) for i in range(20)]
    dsts = [torch.empty(300) for _ in srcs]
    for s, d in zip(srcs, dsts, strict=True):
        ring.to_host(s, d)
    ring.drain()
    assert all(torch.equal(s, d) for s, d in zip(srcs, dsts, strict=True))


def test_to_device_copies_and_waits(ring):
    src = torch.arange(1000, dtype=torch.float32)
    dst = torch.zeros(1000)
    up = ring.to_device(src, dst)
    up.wait()
    assert torch.equal(dst, src)


def test_size_mismatch_is_refused_before_anything_is_queued(ring):
    with pytest.raises(ValueError, match="staging copy of 40 bytes into 36"):
        ring.to_host(torch.zeros(10), torch.zeros(9))
    assert ring._pending == 0


def test_a_worker_error_reaches_the_caller(ring):
    ring._start()
    ring._submit(lambda: 1 / 0)
    with pytest.raises(RuntimeError, match="staged host copy failed: division by zero"):
        ring.drain()
    ring.drain()  # raised once, then the ring works again
    dst = torch.empty(5)
    ring.to_host(torch.ones(5), dst)
    ring.drain()
    assert torch.equal(dst, torch.ones(5))


def test_inference_tensors_made_by_the_caller_can_be_filled(ring):
    with torch.inference_mode():
        dst = torch.zeros(300)
        ring.to_device(torch.ones(300), dst).wait()
        host = torch.empty(300)
        ring.to_host(torch.full((300,), 2.0), host)
        ring.drain()
    assert torch.equal(dst, torch.ones(300)) and torch.equal(host, torch.full((300,), 2.0))


def test_idle_workers_keep_no_block_alive():
    import gc
    import weakref

    from lib_imgcond.memory import host_blocks

    src = torch.randn(host_blocks.MIN_MAPPED // 4)
    dst, mapping = host_blocks.empty(src.numel(), torch.float32)
    ring = StagingRing(slots=2, slot_bytes=1 << 20, workers=2, pin=False)
    ring.to_host(src, dst)
    ring.drain()
    assert torch.equal(dst, src)
    alive = weakref.ref(mapping)
    del dst, mapping
    gc.collect()
    assert alive() is None  # dropped with its reference, not held by the last job a worker ran
