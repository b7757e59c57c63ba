"""Fixtures shared by the unit tests."""

from __future__ import annotations

import gc

import pytest
import torch

from lib_imgcond.memory import host_blocks as hb


@pytest.fixture
def fake_cuda(monkeypatch):
    """host_blocks with a recording fake of cudaHostRegister / cudaHostUnregister: yields the calls."""
    calls: list[tuple] = []

    def register(ptr, size, flags):
        calls.append(("register", ptr, size, flags))
        return 0

    def unregister(ptr):
        calls.append(("unregister", ptr))
        return 0

    monkeypatch.setitem(hb._state, "api", (register, unregister))
    monkeypatch.setitem(hb._state, "failed", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    yield calls
    hb.idle()
    gc.collect()
