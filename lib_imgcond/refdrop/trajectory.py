"""RefDrop compact references ("trajectory" storage): what re-creates a reference's self-attention, not the K/V.

Per model evaluation of a pass the recording keeps the recorded batch item's input latent and sigma and, per model
call of that evaluation, its batch composition (which branches, cond = 0 / uncond = 1, in which order); the
conditioning of each branch (every batch-sized tensor the model call takes: SDXL's `y` besides the cross-attention
context) is kept once per pass while it stays the same. At Use time the host replays the evaluation nearest in
progress through the model, with the same composition as at record time, and blends the K/V that replay produces.

Files are .safetensors with the K/V references' metadata conventions (`format`, `family`, `steps`, `trace`, …),
`format_version` 2 and `storage: trajectory`; `load`, `info` and `save` dispatch on the storage kind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors import safe_open

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.memory import arena
from lib_imgcond.refdrop import file_format, reference
from lib_imgcond.refdrop.file_format import common_fields, common_header
from lib_imgcond.refdrop.layers import check_family, layer_table
from lib_imgcond.refdrop.reference import base_meta

FORMAT_VERSION = 2
STORAGE = "trajectory"
KV = "kv"
PASSES = ("first", "hires")
LABELS = {KV: "K/V", STORAGE: "Trajectory"}


def _same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


class Trajectory:
    """A reference stored as the inputs of its model calls; served by replaying them (see the module docstring)."""

    replayed = True  # the host runs it through the model each evaluation instead of reading stored K/V

    def __init__(self, name: str, family: str, meta: Mapping[str, Any] | None = None):
        self.name = name
        self.family = check_family(family)
        self.meta = base_meta(FORMAT_VERSION, meta, storage=STORAGE, trace={})
        self.meta["steps"] = dict(self.meta["steps"])
        # pass -> evaluations: {"sigma": (1,), "xs": [(1, C, h, w)], "calls": [[(branch, x index, cond index)]]}
        self.evals: dict[str, list[dict[str, Any]]] = {}
        self.conds: dict[str, list[dict[str, torch.Tensor]]] = {}  # pass -> distinct conditionings

    def __deepcopy__(self, memo: dict) -> Trajectory:
        return self  # Forge deep-copies model_options on clone(); a reference stays shared

    def __repr__(self) -> str:
        return f"Trajectory({self.name!r}, {self.family}, {len(self)} evaluations, {arena.format_bytes(self.nbytes)})"

    def __len__(self) -> int:
        return sum(len(e) for e in self.evals.values())

    # --- recording ---------------------------------------------------------------------------------------------
    def add_call(
        self,
        pass_name: str,
        e: int,
        slots: Sequence[tuple[int, torch.Tensor, Mapping[str, torch.Tensor]]],
        sigma: torch.Tensor,
    ) -> None:
        """Keep one model call of evaluation `e`: per batch chunk, in the call's order, its branch (0 cond, 1 uncond;
        an `AND` prompt has several cond chunks) with the recorded item's latent and conditioning rows; `sigma` is
        the item's sigma (the same in every chunk)."""
        if pass_name not in PASSES:
            raise ImgcondError(f"RefDrop trajectory pass must be one of {', '.join(PASSES)}, not {pass_name!r}")
        evals = self.evals.setdefault(pass_name, [])
        if e != len(evals) - 1:
            if e != len(evals):
                raise ImgcondError(f"RefDrop trajectory: evaluation {e} of {pass_name} follows {len(evals) - 1}")
            evals.append({"sigma": _host(sigma.reshape(1)), "xs": [], "calls": []})
        entry = evals[e]
        call = []
        for branch, x, cond in slots:
            row = _host(x)
            xi = next((i for i, t in enumerate(entry["xs"]) if t.shape == row.shape and torch.equal(t, row)), None)
            if xi is None:  # the same latent in every chunk (CFG): kept once
                entry["xs"].append(row)
                xi = len(entry["xs"]) - 1
            call.append((int(branch), xi, self._cond_index(pass_name, cond)))
        entry["calls"].append(call)

    def _cond_index(self, pass_name: str, cond: Mapping[str, torch.Tensor]) -> int:
        table = self.conds.setdefault(pass_name, [])
        cond = {k: _host(v) for k, v in cond.items()}  # compared on the host (the table lives there)
        for i in range(len(table) - 1, -1, -1):
            if _same(table[i], cond):
                return i
        table.append(cond)
        return len(table) - 1

    def finalize(self, steps: Mapping[str, int], trace: Mapping[str, Sequence[float]], uncond: bool) -> None:
        """After the recording: the passes' step counts and progress traces (the uncond branch is offered for Use
        only where it was asked for and recorded)."""
        self.meta["steps"], self.meta["trace"] = {}, {}
        for name, entries in self.evals.items():
            self.meta["steps"][name] = int(steps[name])
            self.meta["trace"][name] = [float(t) for t in trace[name]]
            if uncond and all(any(slot[0] == 1 for slot in call) for entry in entries for call in entry["calls"]):
                self.meta["steps"][f"{name}_uncond"] = int(steps[name])
                self.meta["trace"][f"{name}_uncond"] = list(self.meta["trace"][name])
        first = next((entry["xs"][0] for entries in self.evals.values() for entry in entries), None)
        self.meta["dtype"] = str(first.dtype).replace("torch.", "") if first is not None else ""
        self.meta["layers"] = [list(x[:3]) for x in layer_table(self.family)]

    # --- what Use asks of a reference --------------------------------------------------------------------------
    def has_pass(self, pass_name: str) -> bool:
        return pass_name in self.meta["steps"]

    def steps(self, pass_name: str) -> int:
        return int(self.meta["steps"].get(pass_name, 0))

    def layers(self, pass_name: str | None = None) -> set[tuple[str, int, int]]:
        """Every layer: a replay produces the K/V of all of them."""
        if pass_name is not None and not self.has_pass(pass_name):
            return set()
        return {tuple(x[:3]) for x in layer_table(self.family)}

    def channels(self, layer: Sequence[Any]) -> None:
        return None  # a replay runs the loaded model itself: its K/V always fit it

    def branches(self, pass_name: str) -> tuple[int, ...]:
        """The branches Use can blend from this pass: cond, and uncond where it was recorded for Use."""
        return (0, 1) if self.has_pass(f"{pass_name}_uncond") else (0,)

    def calls(self, pass_name: str, e: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor, dict]]:
        """The model calls of evaluation `e`, each as (branch of each chunk, x, sigma, conditioning) batched in the
        recorded order, on the CPU (the caller moves them)."""
        entry = self.evals[pass_name][e]
        out = []
        for call in entry["calls"]:
            x = torch.cat([entry["xs"][xi] for _, xi, _ in call])
            sigma = entry["sigma"].expand(len(call)).contiguous()
            conds = [self.conds[pass_name][ci] for _, _, ci in call]
            out.append(([b for b, _, _ in call], x, sigma, {k: torch.cat([c[k] for c in conds]) for k in conds[0]}))
        return out

    @property
    def nbytes(self) -> int:
        seen: dict[int, int] = {}
        for entries in self.evals.values():
            for entry in entries:
                for t in (entry["sigma"], *entry["xs"]):
                    seen[id(t)] = t.numel() * t.element_size()
        for table in self.conds.values():
            for cond in table:
                for t in cond.values():
                    seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())


def estimate_bytes(
    latent: Sequence[int], evaluations: int, cond_shapes: Sequence[Sequence[int]], branches: int, bytes_per_el: int = 4
) -> int:
    """Bytes of a trajectory: one latent and one sigma per evaluation, one conditioning per branch (constant)."""
    n_latent = 1
    for d in latent:
        n_latent *= int(d)
    n_cond = 0
    for shape in cond_shapes:
        n = 1
        for d in shape:
            n *= int(d)
        n_cond += n
    return (evaluations * (n_latent + 1) + branches * n_cond) * bytes_per_el


# --- file format --------------------------------------------------------------------------------------------------
def _tensors(traj: Trajectory) -> tuple[list[tuple[str, torch.Tensor]], dict]:
    tensors, layout = [], {}
    for name, entries in traj.evals.items():
        rows = []
        for e, entry in enumerate(entries):
            tensors.append((f"{name}/{e}/sigma", entry["sigma"]))
            tensors += [(f"{name}/{e}/x/{i}", x) for i, x in enumerate(entry["xs"])]
            rows.append({"xs": len(entry["xs"]), "calls": [[list(slot) for slot in call] for call in entry["calls"]]})
        conds = []
        for i, cond in enumerate(traj.conds.get(name, [])):
            conds.append(sorted(cond))
            tensors += [(f"{name}/cond/{i}/{k}", cond[k]) for k in sorted(cond)]
        layout[name] = {"evals": rows, "conds": conds}
    return tensors, layout


def save_trajectory(traj: Trajectory, path: str | os.PathLike) -> None:
    """Write `traj` as one .safetensors file (atomically: temp file + os.replace)."""
    if not len(traj):
        raise ImgcondError(f"reference '{traj.name}' is empty: nothing was recorded, so there is nothing to save")
    path = os.fspath(path)
    tensors, layout = _tensors(traj)
    m = traj.meta
    meta = {
        **common_header(STORAGE, FORMAT_VERSION, traj.name, traj.family, m["steps"], m),
        "evaluations": json.dumps(layout),
    }
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        file_format._write_safetensors(tmp, tensors, meta)
        os.replace(tmp, path)
    except OSError as e:
        raise ImgcondError(
            f"could not write RefDrop reference {path}: {e}; check free disk space and permissions"
        ) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _header(path: str) -> dict[str, str]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata()
    except Exception as e:
        raise file_format._open_error(path, e) from e
    if not meta or meta.get("format") != file_format.FORMAT:
        raise ImgcondError(f"{path} is not an imgcond RefDrop reference (no '{file_format.FORMAT}' metadata)")
    return meta


def storage_of(meta: Mapping[str, str], path: str) -> str:
    kind = meta.get("storage", KV)
    if kind not in LABELS:
        raise ImgcondError(
            f"{path} stores its reference as {kind!r}, which this imgcond cannot read (it reads "
            f"{', '.join(LABELS)}); update sd-webui-imgcond or record the reference again"
        )
    return kind


def _check(path: str, meta: Mapping[str, str]) -> dict[str, Any]:
    try:
        info = common_fields(path, meta)
        version = info["format_version"]
        info |= {"storage": STORAGE, "evaluations": json.loads(meta.get("evaluations", "{}"))}
    except (ValueError, TypeError, AttributeError) as e:
        raise file_format._corrupt(path, f"bad metadata: {e}") from e
    if version != FORMAT_VERSION:
        raise ImgcondError(
            f"{path} is a RefDrop trajectory of file format {version}, but this imgcond reads format "
            f"{FORMAT_VERSION}; update sd-webui-imgcond or record the reference again"
        )
    check_family(info["family"])
    return info


def load_trajectory(path: str | os.PathLike) -> Trajectory:
    """Read and validate a trajectory file."""
    path = os.fspath(path)
    info = _check(path, _header(path))
    meta = {k: info[k] for k in ("steps", "width", "height", "dtype", "layers", "created", "source", "trace")}
    traj = Trajectory(info["name"], info["family"], meta)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            names = set(f.keys())

            def tensor(name: str) -> torch.Tensor:
                if name not in names:
                    raise file_format._corrupt(path, f"tensor {name} missing")
                return f.get_tensor(name)

            for pass_name, layout in info["evaluations"].items():
                if pass_name not in PASSES:
                    raise file_format._corrupt(path, f"unknown pass {pass_name!r}")
                traj.conds[pass_name] = [
                    {k: tensor(f"{pass_name}/cond/{i}/{k}") for k in keys} for i, keys in enumerate(layout["conds"])
                ]
                entries = traj.evals[pass_name] = []
                for e, row in enumerate(layout["evals"]):
                    xs = [tensor(f"{pass_name}/{e}/x/{i}") for i in range(int(row["xs"]))]
                    calls = [[(int(b), int(xi), int(ci)) for b, xi, ci in call] for call in row["calls"]]
                    for call in calls:
                        for _b, xi, ci in call:
                            if xi >= len(xs) or ci >= len(traj.conds[pass_name]):
                                raise file_format._corrupt(
                                    path, f"evaluation {e} of {pass_name} names a missing tensor"
                                )
                    entries.append({"sigma": tensor(f"{pass_name}/{e}/sigma"), "xs": xs, "calls": calls})
    except ImgcondError:
        raise
    except Exception as e:
        raise file_format._open_error(path, e) from e
    for name in traj.meta["steps"]:
        base = name.removesuffix("_uncond")
        if len(traj.evals.get(base, [])) != len(traj.meta["trace"].get(name, [])):
            raise file_format._corrupt(
                path,
                f"the {name} pass has {len(traj.evals.get(base, []))} evaluations but "
                f"{len(traj.meta['trace'].get(name, []))} trace entries",
            )
    return traj


# --- dispatch on the storage kind ---------------------------------------------------------------------------------
def load(path: str | os.PathLike, name: str | None = None) -> reference.Reference | Trajectory:
    """A reference file of either kind; `name`, when given, is the reference's name (the file's, for the library)."""
    path = os.fspath(path)
    if storage_of(_header(path), path) == STORAGE:
        traj = load_trajectory(path)
        if name is not None:
            traj.name = name
        return traj
    return file_format.load_reference(path, name=name)


def info(path: str | os.PathLike) -> dict[str, Any]:
    """Header-only summary of a reference file of either kind, with its `storage` kind."""
    path = os.fspath(path)
    meta = _header(path)
    if storage_of(meta, path) != STORAGE:
        out = file_format.reference_info(path)
        out["storage"] = KV
        return out
    out = _check(path, meta)
    del out["evaluations"]
    size = os.path.getsize(path)
    out.update(
        path=path,
        size_bytes=size,
        size=arena.format_bytes(size),
        layer_count=len(out["layers"]),
        resolution=f"{out['width']}×{out['height']}",
    )
    return out


def save(ref: reference.Reference | Trajectory, path: str | os.PathLike) -> None:
    if isinstance(ref, Trajectory):
        save_trajectory(ref, path)
    else:
        file_format.save_reference(ref, path)


def storage(ref: Any) -> str:
    return STORAGE if isinstance(ref, Trajectory) else KV
