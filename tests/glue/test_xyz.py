"""X/Y/Z axes registered against a fake of Forge's scripts/xyz_grid.py module."""

from __future__ import annotations

import copy
import sys
import types
from types import SimpleNamespace

import pytest

from lib_imgcond.ui import xyz
from lib_imgcond.ui.refdrop_spec import SPEC


class AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.choices = label, type, apply, choices


@pytest.fixture
def fake_xyz(monkeypatch):
    grid = types.ModuleType("xyz_grid.py")
    grid.AxisOption = AxisOption
    grid.axis_options = [AxisOption("Seed", int, None)]
    data = SimpleNamespace(script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=grid)
    modules = types.ModuleType("modules")
    modules.scripts = SimpleNamespace(scripts_data=[data])
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.scripts", modules.scripts)
    return grid


def test_axes_registered_once_with_choices(fake_xyz):
    assert xyz.register_axes(SPEC, "RefDrop", {"reference": lambda: ["cat", "dog"]}) == 2
    assert xyz.register_axes(SPEC, "RefDrop") == 0  # idempotent across UI reloads
    labels = {o.label: o for o in fake_xyz.axis_options}
    assert labels["[RefDrop] RFG coefficient c"].type is float
    assert labels["[RefDrop] Reference"].choices() == ["cat", "dog"]


def test_cells_get_their_own_overrides(fake_xyz):
    xyz.register_axes(SPEC, "RefDrop")
    axis = next(o for o in fake_xyz.axis_options if o.label.endswith("RFG coefficient c"))
    p = SimpleNamespace()
    cell_a, cell_b = copy.copy(p), copy.copy(p)
    axis.apply(cell_a, 0.2, None)
    axis.apply(cell_b, -0.4, None)
    assert xyz.overrides(cell_a, SPEC) == {"coefficient": 0.2}
    assert xyz.overrides(cell_b, SPEC) == {"coefficient": -0.4}
    assert xyz.overrides(p, SPEC) == {}
    assert SPEC.parse([True], xyz.overrides(cell_b, SPEC))["coefficient"] == -0.4
