"""X/Y/Z axes registered against a fake of Forge's scripts/xyz_grid.py module."""

from __future__ import annotations

import copy
import sys
import types
from types import SimpleNamespace

import pytest

from lib_imgcond.common.errors import ArgumentError
from lib_imgcond.refdrop.spec import SPEC
from lib_imgcond.webui import xyz


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
    assert xyz.register_axes(SPEC, "RefDrop", {"reference": lambda: ["cat", "dog"]}) == 5
    assert xyz.register_axes(SPEC, "RefDrop") == 0  # idempotent across UI reloads
    labels = {o.label: o for o in fake_xyz.axis_options}
    assert labels["[RefDrop] RFG coefficient c"].type is float
    assert labels["[RefDrop] Record every k-th evaluation"].type is int
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


class ConfirmingAxisOption(AxisOption):
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        super().__init__(label, type, apply, choices=choices)
        self.confirm = confirm


def test_axis_values_are_confirmed_before_the_grid(fake_xyz):
    fake_xyz.AxisOption = ConfirmingAxisOption
    xyz.register_axes(SPEC, "RefDrop")
    axis = next(o for o in fake_xyz.axis_options if o.label.endswith("RFG coefficient c"))
    axis.confirm(None, [0.0, 0.5, -1.0])
    with pytest.raises(ArgumentError, match=r"refdrop\.coefficient=1\.5"):
        axis.confirm(None, [0.0, 1.5])


def test_hook_registers_at_import_and_before_the_ui(fake_xyz, monkeypatch):
    """An API-only server fixes its X/Y/Z choices before any on_before_ui callback: the axes must exist at once."""
    later = []
    callbacks = types.ModuleType("modules.script_callbacks")
    callbacks.on_before_ui = later.append
    monkeypatch.setitem(sys.modules, "modules.script_callbacks", callbacks)
    sys.modules["modules"].script_callbacks = callbacks
    xyz.hook(SPEC, "RefDrop")
    assert any(o.label == "[RefDrop] RFG coefficient c" for o in fake_xyz.axis_options)
    count = len(fake_xyz.axis_options)
    (callback,) = later
    callback()  # a UI (re)load later: no duplicates
    assert len(fake_xyz.axis_options) == count
