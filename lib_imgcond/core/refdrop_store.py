"""RefDrop K/V store: the names other code imports, gathered from the modules that hold them by concern.

* `refdrop_host`: pinned host memory (HostArena), giving it back (trim_host_memory), format_bytes
* `refdrop_reference`: RefKey and the in-RAM Reference
* `refdrop_checks`: RAM budget, GPU residency and compatibility checks
* `refdrop_file`: the .safetensors file format (save, load, header-only info)
* `refdrop_prefetch`: the Prefetcher
"""

from __future__ import annotations

from lib_imgcond.core.refdrop_checks import (
    check_budget,
    check_compatible,
    check_shapes,
    estimate_bytes,
    fits_on_device,
)
from lib_imgcond.core.refdrop_file import (
    _ST_DTYPES,
    FORMAT,
    _check_header,
    _corrupt,
    _header_meta,
    _open_error,
    _write_safetensors,
    load_reference,
    reference_info,
    save_reference,
)
from lib_imgcond.core.refdrop_host import HostArena, _cpu_tensor, _to_host, format_bytes, trim_host_memory
from lib_imgcond.core.refdrop_prefetch import Prefetcher
from lib_imgcond.core.refdrop_reference import (
    FORMAT_VERSION,
    PASSES,
    SOURCES,
    Layer,
    Reference,
    RefKey,
    _key_order,
    _layer,
    _positions,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PASSES",
    "SOURCES",
    "_ST_DTYPES",
    "HostArena",
    "Layer",
    "Prefetcher",
    "RefKey",
    "Reference",
    "_check_header",
    "_corrupt",
    "_cpu_tensor",
    "_header_meta",
    "_key_order",
    "_layer",
    "_open_error",
    "_positions",
    "_to_host",
    "_write_safetensors",
    "check_budget",
    "check_compatible",
    "check_shapes",
    "estimate_bytes",
    "fits_on_device",
    "format_bytes",
    "load_reference",
    "reference_info",
    "save_reference",
    "trim_host_memory",
]
