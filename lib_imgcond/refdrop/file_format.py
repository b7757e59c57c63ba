"""RefDrop reference files: one .safetensors per reference (K/V tensors + metadata), header checks, listings."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.memory.arena import HostArena, _to_host, format_bytes
from lib_imgcond.refdrop import precision as prec
from lib_imgcond.refdrop.layers import check_family
from lib_imgcond.refdrop.reference import FORMAT_VERSION, PASSES, Reference, RefKey, _key_order

FORMAT = "imgcond-refdrop"

_ST_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    prec.FP8_DTYPE: "F8_E4M3",
}
SCALES = "fp8_scales"  # fp8 files: one (keys, 2) F32 tensor, the K and V scales of each key in `keys` order


def common_header(
    storage: str, format_version: int, name: str, family: str, steps: Mapping[str, int], meta: Mapping[str, Any]
) -> dict[str, str]:
    """The metadata fields every reference file writes (K/V and trajectory); `common_fields` reads them back."""
    return {
        "format": FORMAT,
        "format_version": str(format_version),
        "storage": storage,
        "name": str(name),
        "family": family,
        "steps": json.dumps(dict(steps)),
        "width": str(int(meta.get("width") or 0)),
        "height": str(int(meta.get("height") or 0)),
        "dtype": str(meta.get("dtype", "")),
        "layer_count": str(len(meta["layers"])),
        "layers": json.dumps(meta["layers"]),
        "created": str(meta.get("created", "")),
        "source": str(meta.get("source", "generation")),
        "trace": json.dumps(meta.get("trace", {})),
    }


def _header_meta(ref: Reference, keys: list[RefKey]) -> dict[str, str]:
    m = ref.meta
    extra = {"thumbnail": str(m["thumbnail"])} if m.get("thumbnail") else {}
    steps = {p: ref.steps(p) for p in PASSES if ref.has_pass(p)}
    version = 2 if ref.precision == prec.FP8 else 1  # version 1 readers still read the others
    return {
        **common_header("kv", version, ref.name, ref.family, steps, m),  # "trajectory" is trajectory.py's
        "keys": json.dumps([list(k) for k in keys]),
        "precision": ref.precision,
        "record_every": str(int(m.get("record_every") or 1)),
        **extra,
    }


def _write_safetensors(path: str, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """Stream tensors into a .safetensors file without building the whole file in memory."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors:
        if t.dtype not in _ST_DTYPES:
            raise ImgcondError(f"RefDrop cannot save tensors of dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in tensors:
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def save_reference(ref: Reference, path: str | os.PathLike) -> None:
    """Write ``ref`` as one .safetensors file (atomically: temp file + os.replace)."""
    ref.finalize()
    if not len(ref):
        raise ImgcondError(f"reference '{ref.name}' is empty: nothing was recorded, so there is nothing to save")
    path = os.fspath(path)
    keys = _key_order(ref)
    tensors = []
    for key in keys:
        k, v = ref.get(key)
        tensors += [(key.tensor_name("k"), k), (key.tensor_name("v"), v)]
    if ref.precision == prec.FP8:
        scales = [ref.scale(key) for key in keys]
        if any(s is None for s in scales):
            raise ImgcondError(f"reference '{ref.name}' is marked fp8 but some of its K/V have no scale")
        tensors.append((SCALES, torch.tensor(scales, dtype=torch.float32)))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        _write_safetensors(tmp, tensors, _header_meta(ref, keys))
        os.replace(tmp, path)
    except OSError as e:
        msg = f"could not write RefDrop reference {path}: {e}; check free disk space and permissions"
        raise ImgcondError(msg) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _corrupt(path: str, why: object) -> ImgcondError:
    return ImgcondError(f"RefDrop reference {path} is truncated or corrupt ({why}); record it again")


def common_fields(path: str, meta: Mapping[str, str]) -> dict[str, Any]:
    """The metadata fields every reference file has (K/V and trajectory), decoded; ValueError/TypeError if bad."""
    return {
        "name": meta.get("name") or os.path.splitext(os.path.basename(path))[0],
        "family": meta.get("family", ""),
        "steps": {str(p): int(n) for p, n in json.loads(meta.get("steps", "{}")).items()},
        "width": int(meta.get("width", 0)),
        "height": int(meta.get("height", 0)),
        "dtype": meta.get("dtype", ""),
        "layers": json.loads(meta.get("layers", "[]")),
        "created": meta.get("created", ""),
        "source": meta.get("source", "generation"),
        "format_version": int(meta.get("format_version", "")),
        "trace": json.loads(meta.get("trace", "{}")),
    }


def _check_header(path: str, meta: Mapping[str, str] | None) -> dict[str, Any]:
    """Validate the metadata block and decode its JSON/int fields."""
    if not meta or meta.get("format") != FORMAT:
        raise ImgcondError(f"{path} is not an imgcond RefDrop reference (no '{FORMAT}' metadata)")
    try:
        info = common_fields(path, meta)
        version = info["format_version"]
        info |= {
            "keys": json.loads(meta.get("keys", "[]")),
            "precision": prec.check_precision(meta.get("precision") or _precision_of(meta.get("dtype", ""))),
            "record_every": int(meta.get("record_every", 1)),
            "thumbnail": meta.get("thumbnail", ""),
        }
        if info["record_every"] < 1:
            raise ValueError(f"record_every {info['record_every']}")
    except (ValueError, TypeError, AttributeError) as e:
        raise _corrupt(path, f"bad metadata: {e}") from e
    if version < 1 or version > FORMAT_VERSION:
        raise ImgcondError(
            f"{path} uses RefDrop file format {version}, but this imgcond reads format {FORMAT_VERSION}; "
            "update sd-webui-imgcond or record the reference again"
        )
    kind = meta.get("storage", "kv")  # files before trajectories have no kind: K/V
    if kind != "kv":
        raise ImgcondError(f"{path} holds a '{kind}' RefDrop reference, not K/V (read it with refdrop.trajectory.load)")
    check_family(info["family"])
    return info


def _precision_of(dtype: str) -> str:
    """Files written before the precision field: fp16 K/V were stored as fp16 (the model computed fp32 or fp16)."""
    return prec.FP16 if dtype == "float16" else prec.AS_COMPUTED


def _open_error(path: str, e: Exception) -> ImgcondError:
    if not os.path.exists(path):
        return ImgcondError(f"RefDrop reference {path} does not exist; record it first or pick another one")
    return _corrupt(path, e)


def load_reference(path: str | os.PathLike, name: str | None = None) -> Reference:
    """Read and validate a reference file; tensors land in CPU memory (pinned when CUDA is available). `name`, when
    given, is the reference's name (the library passes the file's name: a renamed or copied file is known by it)."""
    path = os.fspath(path)
    arena = HostArena()
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            info = _check_header(path, f.metadata())
            keys = [RefKey(str(a), int(b), str(c), int(d), int(e)) for a, b, c, d, e in info["keys"]]
            names = set(f.keys())
            pairs = []
            for key in keys:
                kn, vn = key.tensor_name("k"), key.tensor_name("v")
                if kn not in names or vn not in names:
                    raise _corrupt(path, f"K/V for {kn[:-2]} missing")
                pairs.append((key, _to_host(f.get_tensor(kn), arena), _to_host(f.get_tensor(vn), arena)))
            scales = None
            if info["precision"] == prec.FP8:
                if SCALES not in names:
                    raise _corrupt(path, "fp8 K/V without their scales")
                scales = f.get_tensor(SCALES).float()
                if tuple(scales.shape) != (len(keys), 2):
                    raise _corrupt(path, f"fp8 scales of shape {tuple(scales.shape)} for {len(keys)} keys")
    except ImgcondError:
        raise
    except Exception as e:
        raise _open_error(path, e) from e
    fields = ("steps", "width", "height", "dtype", "layers", "created", "source", "format_version", "trace")
    meta = {k: info[k] for k in (*fields, "record_every", "thumbnail")}
    ref = Reference(name or info["name"], info["family"], meta, precision=info["precision"])
    ref._arena = arena
    for row, (key, k, v) in enumerate(pairs):
        if scales is not None:
            ref._scales[key] = scales[row].clone()
        elif k.dtype == prec.FP8_DTYPE:
            raise _corrupt(path, f"fp8 K/V at {key.tensor_name('')[:-1]} in a file not marked fp8")
        if k.shape != v.shape or k.dim() != 3:
            shapes = f"{tuple(k.shape)} and {tuple(v.shape)}"
            raise _corrupt(path, f"K and V of {key.tensor_name('')[:-1]} have shapes {shapes}")
        key = ref._check_key(key)
        ref._kv[key] = (k, v)
        ref._seen_steps[key.pass_name] = max(ref._seen_steps.get(key.pass_name, 0), key.step + 1)
        ref._channels[key.layer] = k.shape[-1]
    return ref


def reference_info(path: str | os.PathLike) -> dict[str, Any]:
    """Header-only summary for listings: name, family, size on disk, steps, width×height."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata()
        info = _check_header(path, meta)
        size = os.path.getsize(path)
    except ImgcondError:
        raise
    except Exception as e:
        raise _open_error(path, e) from e
    del info["keys"]
    info.update(
        path=path,
        size_bytes=size,
        size=format_bytes(size),
        resolution=f"{info['width']}×{info['height']}",
        layer_count=len(info["layers"]),
    )
    return info
