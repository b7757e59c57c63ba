"""The family table's host columns (`spec.families.HOSTS`) are what each host's loader really loads: its
`backend.loader.possible_models` (the engine classes it matches checkpoints against), named as the extension names
them (`host.forge.ENGINE_FAMILIES`). Imports the host's loader with the host's python; starts no server."""

from __future__ import annotations

import subprocess

import pytest

from lib_imgcond.host.forge import ENGINE_FAMILIES
from lib_imgcond.spec.families import HOSTS
from tests.e2e import forge

PROBE = """
import sys
from pathlib import Path
here = Path.cwd()
sys.argv = [sys.argv[0], "--cpu" if (here / "modules_forge" / "packages").is_dir() else "--always-cpu"]
for extra in ("", "packages_3rdparty", "modules_forge/packages", "repositories/huggingface_guess"):
    sys.path.insert(0, str(here / extra))
from backend import loader
print("ENGINES " + " ".join(m.__name__ for m in loader.possible_models))
"""


def test_each_host_loads_the_families_the_table_says():
    paths = forge.forge_paths()
    if paths is None:
        pytest.skip(forge.SKIP_REASON)
    forge_dir, python = paths
    proc = subprocess.run(
        [str(python), "-c", PROBE], cwd=forge_dir, env=forge.offline_env(), capture_output=True, text=True, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ENGINES ")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    engines = lines[-1].split()[1:]
    unknown = [e for e in engines if e not in ENGINE_FAMILIES]
    assert not unknown, f"engines the extension does not name (add them to host.forge.ENGINE_FAMILIES): {unknown}"
    host = "Forge Neo" if forge.is_neo() else "Forge 2.0"
    assert sorted(ENGINE_FAMILIES[e] for e in engines) == sorted(HOSTS[host])
