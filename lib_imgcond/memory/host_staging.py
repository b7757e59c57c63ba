"""Device↔host copies of RefDrop's K/V through a small pinned staging ring, with the CPU side on worker threads.

Page-locking host memory is slow (cudaHostAlloc ran at 1.6–2.8 GB/s on an H200 host) while a recording streams K/V
at about 9 GB/s, so a recording that pins its storage as it goes runs several times slower than sampling. Here a
recording's storage is plain pageable memory: a dispatcher thread copies each block, on its own stream after the
caller's queued work, into one of a few fixed pinned slots (device → pinned at ~55 GB/s), and a worker copies the
slot into the pageable block (torch's copy runs on up to THREADS intra-op threads per worker, which also take the
first-touch page faults in parallel; uncapped, the workers' teams outnumber the cores and slow the sampling thread);
the sampling thread only records an event, so it never waits for a free slot. Uploading such a
reference for Use runs the other way: a worker copies a chunk into a slot and queues the slot's host → device copy on
the caller's stream. The only pinned memory of its own is the ring, SLOTS × SLOT_BYTES, allocated once per process
on first use (a finished recording is page-locked in place afterwards: `host_blocks`).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from contextlib import nullcontext

import torch

from lib_imgcond.memory import native

SLOT_BYTES = 128 << 20
SLOTS = 4
WORKERS = 2
THREADS = 4  # intra-op threads per worker's copies


class Upload:
    """A host → device copy queued on a worker: `wait()` makes the caller's current stream wait for it."""

    def __init__(self):
        self.queued = threading.Event()  # set once every device copy of it is on its stream
        self.event = None  # CUDA event recorded after its last device copy (None for a CPU destination)
        self.error: BaseException | None = None

    def wait(self) -> None:
        self.queued.wait()
        if self.error is not None:
            raise RuntimeError(f"RefDrop: copying a reference to the device failed: {self.error}") from self.error
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)


class StagingRing:
    """A fixed set of pinned slots, a dispatcher thread and worker threads; see the module docstring."""

    BACKLOG = 512 << 20  # device bytes to_host() may hold in flight before the caller waits

    def __init__(
        self,
        slots: int = SLOTS,
        slot_bytes: int = SLOT_BYTES,
        workers: int = WORKERS,
        pin: bool | None = None,
        threads: int | None = THREADS,
    ):
        self.slot_bytes, self.n_slots, self.n_workers, self.threads = slot_bytes, slots, workers, threads
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._slots: list[torch.Tensor] = []
        self._slot_events: list = []  # per slot: the CUDA event its last device copy recorded (reuse waits for it)
        self._free: queue.Queue[int] = queue.Queue()
        self._jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self._backlog = 0  # bytes of device sources handed to the dispatcher and not yet copied out
        self._dispatch: queue.Queue = queue.Queue()
        self._streams: dict = {}  # device -> the dispatcher's copy stream
        self._error: BaseException | None = None

    @property
    def pinned_bytes(self) -> int:
        return sum(s.numel() for s in self._slots) if self.pin else 0

    def _start(self) -> None:
        with self._lock:
            if self._slots:
                return
            for i in range(self.n_slots):
                with torch.inference_mode(False):  # plain tensors: every thread may write them
                    self._slots.append(torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=self.pin))
                self._slot_events.append(None)
                self._free.put(i)
            for n in range(self.n_workers):
                threading.Thread(target=self._work, name=f"imgcond-staging-{n}", daemon=True).start()
            threading.Thread(target=self._dispatcher, name="imgcond-staging-dispatch", daemon=True).start()

    def _work(self) -> None:
        if self.threads:
            native.limit_threads(self.threads)
        while True:
            job = self._jobs.get()
            try:
                job()
            except BaseException as e:  # kept for the caller: drain() raises it
                self._error = self._error or e
            finally:
                job = None  # an idle worker must not keep the last job's blocks alive
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _submit(self, job: Callable[[], None]) -> None:
        """Queue `job` for a worker, under the caller's inference mode (thread-local in torch: a worker must update an
        inference tensor the caller made inside it)."""
        inference = torch.is_inference_mode_enabled()

        def run():
            with torch.inference_mode(inference):
                job()

        with self._lock:
            self._pending += 1
        self._jobs.put(run)

    def _take(self) -> int:
        """A free slot, once its previous device copy (if any) is done."""
        i = self._free.get()
        event = self._slot_events[i]
        if event is not None:
            event.synchronize()
            self._slot_events[i] = None
        return i

    def to_host(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy `src` (contiguous, any device) into `dst` (host memory of the same size in bytes) asynchronously and
        without blocking the caller (beyond BACKLOG bytes of device sources in flight): the dispatcher thread copies
        it into slots, after the work queued so far on the current stream, and a worker copies each slot into `dst`.
        Do not change `src` afterwards; call drain() before reading `dst`."""
        self.raise_error()
        s, d = _bytes(src), _bytes(dst)
        if s.numel() != d.numel():
            raise ValueError(f"staging copy of {s.numel()} bytes into {d.numel()}")
        self._start()
        ready = stream = None
        if s.is_cuda:
            stream = self._streams.get(s.device)
            if stream is None:
                stream = self._streams[s.device] = torch.cuda.Stream(device=s.device)
            ready = torch.cuda.Event()
            ready.record()
            s.record_stream(stream)  # its memory is not reused before the dispatcher's copies out of it are done
        with self._idle:
            self._idle.wait_for(lambda: self._backlog <= self.BACKLOG)  # bounds the device memory held
            self._backlog += s.numel() if s.is_cuda else 0
            self._pending += 1
        self._dispatch.put((s, d, ready, stream, torch.is_inference_mode_enabled()))

    def _dispatcher(self) -> None:
        """Issue the device → slot copies of to_host() in order, each slot's host copy on a worker."""
        while True:
            s, d, ready, stream, inference = self._dispatch.get()
            try:
                if stream is not None:
                    stream.wait_event(ready)
                for start in range(0, s.numel(), self.slot_bytes):
                    n = min(self.slot_bytes, s.numel() - start)
                    i = self._take()  # waits while every slot is in flight: the ring bounds the extra memory
                    event = None
                    with torch.cuda.stream(stream) if stream is not None else nullcontext():
                        self._slots[i][:n].copy_(s[start : start + n], non_blocking=stream is not None)
                        if stream is not None:
                            event = torch.cuda.Event()
                            event.record()

                    def job(i=i, n=n, event=event, out=d[start : start + n]):
                        try:
                            if event is not None:
                                event.synchronize()
                            out.copy_(self._slots[i][:n])
                        finally:
                            self._free.put(i)

                    with torch.inference_mode(inference):  # the caller's mode (see _submit)
                        self._submit(job)
            except BaseException as e:  # kept for the caller: drain() raises it
                self._error = self._error or e
            finally:
                with self._idle:
                    self._backlog -= s.numel() if s.is_cuda else 0
                    self._pending -= 1
                    self._idle.notify_all()
                s = d = job = None  # the source's memory goes back once its copies are issued (see record_stream)

    def to_device(self, src: torch.Tensor, dst: torch.Tensor, stream=None) -> Upload:
        """Queue the copy of host `src` into `dst` (same size in bytes) on a worker; the device copies go on `stream`
        (CUDA). Returns the Upload to wait() for before reading `dst`."""
        self.raise_error()
        s, d = _bytes(src), _bytes(dst)
        if s.numel() != d.numel():
            raise ValueError(f"staging copy of {s.numel()} bytes into {d.numel()}")
        self._start()
        up = Upload()

        def job():
            try:
                for start in range(0, s.numel(), self.slot_bytes):
                    n = min(self.slot_bytes, s.numel() - start)
                    i = self._take()
                    try:
                        slot = self._slots[i][:n]
                        slot.copy_(s[start : start + n])
                        if d.is_cuda:
                            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                                d[start : start + n].copy_(slot, non_blocking=True)
                                self._slot_events[i] = torch.cuda.Event()
                                self._slot_events[i].record()
                        else:
                            d[start : start + n].copy_(slot)
                    finally:
                        self._free.put(i)
                if d.is_cuda:
                    with torch.cuda.stream(stream) if stream is not None else nullcontext():
                        up.event = torch.cuda.Event()
                        up.event.record()
            except BaseException as e:
                up.error = e
                raise
            finally:
                up.queued.set()

        self._submit(job)
        return up

    def drain(self) -> None:
        """Wait until every queued copy is done; raise the first error a worker met."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)
        self.raise_error()

    def raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"RefDrop: a staged host copy failed: {error}") from error


def _bytes(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("staging copies need contiguous tensors")
    return t.reshape(-1).view(torch.uint8)


_RING: StagingRing | None = None
_RING_LOCK = threading.Lock()


def ring() -> StagingRing:
    """The process's ring (pinned when CUDA is available)."""
    global _RING
    with _RING_LOCK:
        if _RING is None:
            shape = os.environ.get("IMGCOND_STAGING", "")  # "slots,MiB per slot,workers[,threads]" (benchmarks)
            if shape:
                slots, mib, workers, *threads = (int(x) for x in shape.split(","))
                _RING = StagingRing(slots, mib << 20, workers, threads=threads[0] if threads else THREADS)
            else:
                _RING = StagingRing()
        return _RING
