"""RefDrop storage precision of recorded K/V: as computed, fp16, or fp8 (float8_e4m3fn with one scale per tensor).

fp8 stores each K and each V tensor divided by its own scale `amax / 448` (448 = the largest e4m3fn value), so the
largest magnitude maps onto the format's top and nothing saturates; fetching multiplies the scale back in the compute
dtype. e4m3fn keeps 3 mantissa bits: a normal value comes back within 1/16 of itself, a value in the subnormal range
(below 2^-6 · scale) within 2^-10 · scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lib_imgcond.common.errors import ArgumentError

AS_COMPUTED, FP16, FP8 = "as computed", "fp16", "fp8"
PRECISIONS = (AS_COMPUTED, FP16, FP8)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
BYTES = {AS_COMPUTED: 4, FP16: 2, FP8: 1}  # per element, for the budget and the size estimate (fp32 computation)


def check_precision(value: Any) -> str:
    value = str(value).strip().lower()
    if value not in PRECISIONS:
        raise ArgumentError("storage precision", value, " or ".join(f"'{p}'" for p in PRECISIONS))
    return value


def from_settings(data: Mapping[str, Any]) -> str:
    """The storage precision from the WebUI settings: `imgcond_refdrop_storage_precision` when it was ever set, else
    the older bool `imgcond_refdrop_store_fp16` (true → fp16), else as computed."""
    if "imgcond_refdrop_storage_precision" in data:
        return check_precision(data["imgcond_refdrop_storage_precision"])
    return FP16 if data.get("imgcond_refdrop_store_fp16") is True else AS_COMPUTED


def storage_dtype(precision: str, src: torch.dtype) -> torch.dtype:
    """The dtype recorded K/V of dtype `src` are kept in (fp16 narrows fp32 only, as it always did)."""
    if precision == FP8 and src.is_floating_point:
        return FP8_DTYPE
    if precision == FP16 and src == torch.float32:
        return torch.float16
    return src


def scales(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One fp32 scale per tensor (on their device): amax / 448, or 1 for an all-zero tensor."""
    amax = torch.stack([t.detach().abs().amax().float() for t in tensors])
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def quantize(t: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """`t / scale` as float8_e4m3fn (computed in fp32, on t's device)."""
    return (t.float() / scale).to(FP8_DTYPE)


def dequantize(t: torch.Tensor, scale: float, dtype: torch.dtype | None) -> torch.Tensor:
    """A stored fp8 tensor back in `dtype` (fp32 when None): the stored value times its scale."""
    return t.to(dtype or torch.float32).mul_(scale)
