"""Capping torch's intra-op threads for one thread (the staging workers') leaves every other thread's alone."""

from __future__ import annotations

import threading

import pytest
import torch

from lib_imgcond.memory import native
from lib_imgcond.memory.host_staging import StagingRing

openmp = "OpenMP" in torch.__config__.parallel_info() and native.loaded("libgomp") is not None
pytestmark = pytest.mark.skipif(
    not openmp or torch.get_num_threads() < 2, reason="needs torch's OpenMP build and two or more intra-op threads"
)


def _in_thread(fn):
    out: dict = {}

    def run():
        out["value"] = fn()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out["value"]


def test_the_cap_holds_for_the_calling_thread_only():
    main = torch.get_num_threads()
    assert _in_thread(lambda: (native.limit_threads(1), torch.get_num_threads())) == (True, 1)
    assert torch.get_num_threads() == main
    assert _in_thread(torch.get_num_threads) == main  # a new thread starts with the process's count


def test_the_cap_survives_the_threads_first_parallel_op():
    def work():
        assert native.limit_threads(1)
        x = torch.ones(1 << 22).add_(1)  # torch's per-thread set-up has run by now and must not reset the cap
        return torch.get_num_threads(), float(x.sum())

    assert _in_thread(work) == (1, float(2 << 22))


def test_staging_workers_run_their_copies_capped():
    ring = StagingRing(slots=2, slot_bytes=96, workers=2, pin=False, threads=1)
    seen: list[int] = []
    ring._start()
    for _ in range(4):
        ring._submit(lambda: seen.append(torch.get_num_threads()))
    ring.drain()
    assert seen == [1] * 4
    assert torch.get_num_threads() >= 2


@pytest.mark.parametrize("name", ["libcudart-that-is-not-there", "no-such-library"])
def test_a_library_not_loaded_is_none(name):
    assert native.loaded(name) is None
