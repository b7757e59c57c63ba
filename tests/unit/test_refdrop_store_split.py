"""refdrop_store keeps every name it had before the split, each the very object of the module that now holds it."""

from __future__ import annotations

import importlib

from lib_imgcond.core import refdrop_store as store

MOVED = {
    "refdrop_host": ("HostArena", "_cpu_tensor", "_to_host", "format_bytes", "trim_host_memory"),
    "refdrop_reference": ("FORMAT_VERSION", "PASSES", "SOURCES", "Layer", "Reference", "RefKey", "_key_order",
                          "_layer", "_positions"),
    "refdrop_checks": ("check_budget", "check_compatible", "check_shapes", "estimate_bytes", "fits_on_device"),
    "refdrop_file": ("FORMAT", "_ST_DTYPES", "_check_header", "_corrupt", "_header_meta", "_open_error",
                     "_write_safetensors", "load_reference", "reference_info", "save_reference"),
    "refdrop_prefetch": ("Prefetcher",),
}  # fmt: skip


def test_every_name_is_re_exported_from_its_module():
    for module, names in MOVED.items():
        mod = importlib.import_module(f"lib_imgcond.core.{module}")
        for name in names:
            assert getattr(store, name) is getattr(mod, name), (module, name)
    assert sorted(store.__all__) == sorted(n for names in MOVED.values() for n in names)


def test_split_files_stay_small():
    import pathlib

    core = pathlib.Path(store.__file__).parent
    for module in (*MOVED, "refdrop_store"):
        assert len((core / f"{module}.py").read_text().splitlines()) < 400, module
