"""Status text and a progress bar in the WebUI's progress area (`modules.shared.state`) while slow work runs.

    with progress.status("Redux: encoding reference images", steps=len(images)) as bar:
        for image in images:
            ...
            bar.step()

Outside a WebUI (tests, tools) it does nothing. What it changes on the state is put back when the block ends, so the
sampler's own progress is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class Bar:
    def __init__(self, state: Any, steps: int):
        self.state, self.steps, self.done = state, steps, 0

    def step(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.steps) if self.steps else self.done + n
        if self.state is not None and self.steps:
            self.state.sampling_step = self.done


def _state() -> Any:
    try:
        from modules import shared
    except ImportError:
        return None
    return getattr(shared, "state", None)


@contextlib.contextmanager
def status(text: str, steps: int = 0, state: Any = None) -> Iterator[Bar]:
    """Show `text` (and, when `steps` > 0, a bar of `steps` advanced by `Bar.step`) for the duration of the block."""
    state = state if state is not None else _state()
    if state is None:
        yield Bar(None, steps)
        return
    saved = {name: getattr(state, name, None) for name in ("textinfo", "sampling_step", "sampling_steps")}
    state.textinfo = text
    if steps:
        state.sampling_step, state.sampling_steps = 0, steps
    try:
        yield Bar(state, steps)
    finally:
        for name, value in saved.items():
            if value is not None or name == "textinfo":
                setattr(state, name, value)
