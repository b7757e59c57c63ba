"""RefDrop checks before sampling: the RAM budget, whether a recording may stay in GPU memory, and whether a
reference fits this model, these layers and passes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.memory.arena import format_bytes
from lib_imgcond.refdrop.layers import _lookup, family_label, format_layers
from lib_imgcond.refdrop.reference import PASSES, Reference, _layer


def estimate_bytes(
    token_counts_and_channels: Iterable[tuple[int, int]], steps: int, batch_rows: int, bytes_per_el: int
) -> int:
    """Bytes of K+V for the given (tokens, channels) layers over ``steps`` steps and ``batch_rows`` rows."""
    per_call = sum(int(t) * int(c) for t, c in token_counts_and_channels)
    return 2 * per_call * int(steps) * int(batch_rows) * int(bytes_per_el)


def check_budget(needed_bytes: int, budget_bytes: int) -> None:
    """Raise if a reference would exceed the RAM budget (0 = unlimited)."""
    if budget_bytes > 0 and needed_bytes > budget_bytes:
        raise ImgcondError(
            f"this reference needs {format_bytes(needed_bytes)} but the RAM budget is {format_bytes(budget_bytes)}; "
            "raise it in Settings → ImgCond or select fewer layers/steps"
        )


FREE_AFTER = 0.25  # a recording kept in GPU memory must leave at least this share of it free


def fits_on_device(needed: int, held: int, free: int, total: int, share: float) -> bool:
    """Whether a recording of `needed` bytes may stay in GPU memory: the recordings kept there (`held` bytes, this
    one added) within `share` of the GPU's `total` memory, and at least FREE_AFTER of it still `free` afterwards."""
    if not 0.0 <= share <= 1.0:
        raise ArgumentError("RefDrop GPU share", share, "a share between 0 and 1 (0: recordings stay in RAM)")
    if share == 0 or needed <= 0:
        return False
    return held + needed <= share * total and free - needed >= FREE_AFTER * total


def check_compatible(
    ref: Reference, family: str, layers_needed: Iterable[Sequence[Any]], passes_needed: Iterable[str]
) -> None:
    """Raise ImgcondError when ``ref`` cannot serve this model, these layers and these passes."""
    if ref.family != family:
        recorded, loaded = family_label(ref.family), family_label(family)
        raise ImgcondError(
            f"reference '{ref.name}' was recorded on {recorded} but the loaded model is {loaded}; "
            f"load a {recorded} model or record the reference again"
        )
    needed = {_layer(x) for x in layers_needed}
    for pass_name in sorted(set(passes_needed), key=lambda p: PASSES.index(p) if p in PASSES else 99):
        if pass_name not in PASSES:
            raise ArgumentError("pass", pass_name, " or ".join(PASSES))
        if not ref.has_pass(pass_name):
            if pass_name == "hires":
                raise ImgcondError(
                    f"reference '{ref.name}' has no hires-pass K/V: record it with hires fix enabled "
                    "or turn off 'Use in hires pass'"
                )
            raise ImgcondError(f"reference '{ref.name}' has no first-pass K/V: record it again")
        recorded = ref.layers(pass_name)
        missing = needed - recorded
        if missing:
            where = " for the hires pass" if pass_name == "hires" else ""
            raise ImgcondError(
                f"layers {format_layers(missing, family)} were not recorded in '{ref.name}'{where}; "
                f"select only {format_layers(recorded, family)} or record it again with these layers"
            )


def check_shapes(ref: Reference, layer: Sequence[Any], channels: int) -> None:
    """Raise when the recorded K/V width at ``layer`` differs from the model's (another architecture)."""
    recorded = ref.channels(layer)
    if recorded is not None and recorded != channels:
        lid = _lookup(ref.family).get(_layer(layer))
        where = f"{lid.group}:{lid.index}" if lid else str(tuple(layer))
        raise ImgcondError(
            f"reference '{ref.name}' has {recorded} channels at {where} but the loaded model has {channels}: "
            "it was recorded with a different model architecture; record it again with this model"
        )
