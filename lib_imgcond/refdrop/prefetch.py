"""RefDrop prefetcher: moves a reference's K/V to the sampling device ahead of use."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from lib_imgcond.refdrop import precision as prec
from lib_imgcond.refdrop.reference import Reference, RefKey


class Prefetcher:
    """Moves a reference's K/V to the sampling device ahead of use, keeping about two steps resident."""

    def __init__(self, ref: Reference, device: torch.device | str, dtype: torch.dtype):
        self.ref = ref
        self.device = torch.device(device)
        self.dtype = dtype
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        self._max_steps = 2 if self._cuda else 1
        # (pass, step) -> key -> (k, v, ready event or None); most recently used last
        self._steps: OrderedDict[tuple[str, int], dict[RefKey, tuple[torch.Tensor, torch.Tensor, Any]]] = OrderedDict()

    def __deepcopy__(self, memo: dict) -> Prefetcher:
        return self

    def _bucket(self, key: RefKey) -> dict[RefKey, tuple[torch.Tensor, torch.Tensor, Any]]:
        step = (key.pass_name, key.step)
        if step not in self._steps:
            self._steps[step] = {}
            while len(self._steps) > self._max_steps:
                self._steps.popitem(last=False)
        self._steps.move_to_end(step)
        return self._steps[step]

    def _move(self, t: torch.Tensor, scale: float | None) -> torch.Tensor:
        t = t.to(self.device, non_blocking=t.is_pinned())
        if scale is not None:
            return prec.dequantize(t, scale, self.dtype)
        return t if t.dtype == self.dtype else t.to(self.dtype)

    def _pair(self, key: RefKey) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.ref.get(key)
        sk, sv = self.ref.scale(key) or (None, None)
        return self._move(k, sk), self._move(v, sv)

    def fetch(self, step_keys: Iterable[Sequence[Any]]) -> None:
        """Start copying these keys to the device on a side stream (no-op on CPU)."""
        if not self._cuda:
            return
        with torch.cuda.stream(self._stream):
            for key in step_keys:
                key = RefKey(*key)
                bucket = self._bucket(key)
                if key in bucket or key not in self.ref:
                    continue
                k, v = self._pair(key)
                event = torch.cuda.Event()
                event.record(self._stream)
                bucket[key] = (k, v, event)

    def get(self, key: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Device (k, v) for ``key``: prefetched if available, else copied now."""
        key = RefKey(*key)
        bucket = self._bucket(key)
        hit = bucket.get(key)
        if hit is None:
            hit = (*self._pair(key), None)
            bucket[key] = hit
        k, v, event = hit
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            k.record_stream(stream)
            v.record_stream(stream)
            bucket[key] = (k, v, None)
        return k, v

    def clear(self) -> None:
        """Drop every device copy."""
        self._steps.clear()
