"""memory.host_blocks: mapped host blocks for recordings, and their background page-locking (with a fake CUDA API)."""

from __future__ import annotations

import gc
import logging
import weakref

import torch

from lib_imgcond.memory import host_blocks as hb


def test_small_blocks_are_plain_allocations():
    t, m = hb.empty(1000, torch.float16)
    assert m is None and t.shape == (1000,) and t.dtype == torch.float16


def test_large_block_is_a_mapping_that_lives_as_long_as_its_tensor():
    numel = hb.MIN_MAPPED // 2 + 3  # bf16: just over MIN_MAPPED bytes, not a multiple of a huge page
    t, m = hb.empty(numel, torch.bfloat16)
    assert t.shape == (numel,) and t.dtype == torch.bfloat16
    assert len(m) % hb.HUGE_PAGE == 0 and len(m) >= 2 * numel
    assert t.data_ptr() == m.address
    t.fill_(1.5)
    assert float(t.double().sum()) == 1.5 * numel
    alive = weakref.ref(m)
    del m
    gc.collect()
    assert alive() is not None  # the tensor keeps its mapping
    del t
    gc.collect()
    assert alive() is None


def test_registered_in_the_background_and_unregistered_before_unmapping(fake_cuda):
    t, m = hb.empty(hb.MIN_MAPPED, torch.uint8)
    address, size = m.address, len(m)
    before = hb.locked_bytes()
    hb.register_later([m])
    hb.idle()
    assert m.registered and fake_cuda == [("register", address, size, hb.PORTABLE)]
    assert hb.locked_bytes() == before + size
    alive = weakref.ref(m)
    del t, m
    gc.collect()
    assert fake_cuda[-1] == ("unregister", address) and alive() is None
    assert hb.locked_bytes() == before


def test_registration_stays_under_its_share_of_ram(fake_cuda, monkeypatch):
    monkeypatch.setattr(hb, "_physical_ram", lambda: hb.MIN_MAPPED)  # half of it is less than one block
    t, m = hb.empty(hb.MIN_MAPPED, torch.uint8)
    hb.register_later([m])
    hb.idle()
    assert not m.registered and fake_cuda == []
    del t


def test_failed_registration_is_logged_once_and_stops_trying(fake_cuda, monkeypatch, caplog):
    monkeypatch.setitem(hb._state, "api", (lambda p, n, f: 999, lambda p: 0))
    t1, m1 = hb.empty(hb.MIN_MAPPED, torch.uint8)
    t2, m2 = hb.empty(hb.MIN_MAPPED, torch.uint8)
    before = hb.locked_bytes()
    with caplog.at_level(logging.WARNING, logger="lib_imgcond.memory"):
        hb.register_later([m1, m2])
        hb.idle()
    assert not m1.registered and not m2.registered and hb._state["failed"]
    assert [r.message for r in caplog.records if "page-locking" in r.message] and "999" in caplog.text
    assert len([r for r in caplog.records if "page-locking" in r.message]) == 1
    assert hb.locked_bytes() == before
    del t1, t2


def test_without_cuda_nothing_is_queued(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _t, m = hb.empty(hb.MIN_MAPPED, torch.uint8)
    hb.register_later([m])
    hb.idle()
    assert not m.registered
