"""RefDrop library: rename (RAM and file), thumbnails in the file's metadata, the listing's fields, the size line."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.memory.arena import format_bytes
from lib_imgcond.refdrop import forge_estimate as estimate
from lib_imgcond.refdrop import forge_library, forge_patch
from lib_imgcond.refdrop import forge_refdrop as host
from lib_imgcond.refdrop import layers as rd
from lib_imgcond.refdrop.file_format import reference_info, save_reference
from lib_imgcond.refdrop.reference import Reference
from tests.glue.fakes import FakeEngine, fake_p
from tests.glue.test_refdrop_glue import VALUES


@pytest.fixture(autouse=True)
def library(monkeypatch, tmp_path):
    monkeypatch.setattr(host.library, "references_dir", lambda: str(tmp_path))
    forge_library.REFERENCES.clear()
    yield tmp_path
    forge_library.REFERENCES.clear()


def reference(name="hero", precision="as computed", thumbnail=""):
    lid = rd.layer_table("sd15")[0]
    ref = Reference(name, "sd15", {"width": 64, "height": 48, "steps": {"first": 1}}, precision=precision)
    ref.put(("first", 0, lid.group, lid.block_id, lid.block_index), torch.ones(1, 4, 320), torch.ones(1, 4, 320))
    if thumbnail:
        ref.meta["thumbnail"] = thumbnail
    ref.finalize()
    return ref


def picture(w=300, h=200):
    return Image.new("RGB", (w, h), (200, 30, 90))


def test_thumbnail_is_a_small_jpeg_kept_in_the_file(library):
    uri = forge_library.make_thumbnail(picture())
    assert uri.startswith("data:image/jpeg;base64,")
    assert forge_library.thumbnail_image(uri).size == (128, 85)  # longest side 128, aspect kept
    assert (
        forge_library.thumbnail_image("") is None and forge_library.thumbnail_image("data:image/jpeg;base64,@@") is None
    )
    save_reference(reference(thumbnail=uri), os.path.join(library, "hero.safetensors"))
    (row,) = forge_library.describe()  # from the file
    assert row["thumbnail"] == uri and not row["in_ram"]
    assert forge_library.lookup("hero").meta["thumbnail"] == uri


def test_finish_record_keeps_the_thumbnail_it_is_given(library):
    job = host.Job({**VALUES, "mode": "Record", "record_every": 1}, "sd15", frozenset({("input", 1, 0)}))
    job.record = reference("rec")
    tracker = forge_patch.PassTracker("first", 1)
    tracker.on_eval(1.0)
    uri = forge_library.make_thumbnail(picture(64, 64))
    host.finish_record(job, {"first": tracker}, save_file=True, thumbnail=uri)
    assert reference_info(os.path.join(library, "rec.safetensors"))["thumbnail"] == uri


def test_listing_fields_in_ram_and_from_file(library):
    forge_library.REFERENCES["a"] = reference("a", "fp8")
    save_reference(reference("b", "fp16"), os.path.join(library, "b.safetensors"))
    rows = {r["name"]: r for r in forge_library.describe()}
    a, b = rows["a"], rows["b"]
    assert (a["kept"], a["precision"], a["bytes"], a["resolution"]) == ("RAM", "fp8", 2 * 4 * 320, "64×48")
    assert (b["kept"], b["precision"], b["record_every"]) == ("file", "fp16", 1)
    assert b["bytes"] == os.path.getsize(os.path.join(library, "b.safetensors")) and b["size"].endswith("KiB")
    assert a["thumbnail"] == b["thumbnail"] == ""


def test_rename_moves_ram_and_file_and_refuses_bad_names(library):
    forge_library.REFERENCES["old"] = reference("old")
    forge_library.save("old")
    assert forge_library.rename("old", " new ") == {"renamed": True, "name": "new"}
    assert "old" not in forge_library.REFERENCES and forge_library.REFERENCES["new"].name == "new"
    assert sorted(os.listdir(library)) == ["new.safetensors"]
    forge_library.REFERENCES.clear()
    assert forge_library.lookup("new").name == "new"  # the file's name is the reference's name (its header says "old")
    forge_library.REFERENCES["other"] = reference("other")
    with pytest.raises(ImgcondError, match="'other' already exists"):
        forge_library.rename("new", "other")
    with pytest.raises(ImgcondError, match="'ghost' does not exist"):
        forge_library.rename("ghost", "x")
    with pytest.raises(ArgumentError, match=r"refdrop\.reference"):
        forge_library.rename("new", "a/b")
    assert forge_library.rename("new", "new") == {"renamed": False, "name": "new"}


def test_size_line_from_the_generation_settings():
    gen = {"width": 64, "height": 64, "steps": 4, "sampler_name": "Euler"}
    values = {**VALUES, "mode": "Record", "record_every": 2}
    line = estimate.record_size_line(FakeEngine("sd15"), gen, values, "fp8")
    p = fake_p("sd15", width=64, height=64, steps=4, sampler_name="Euler")
    want = format_bytes(host.estimate_record(p, values, "fp8"))
    assert f"**{want}**" in line and "fp8 storage" in line and "every 2-th" in line
    assert "⚠️" in estimate.record_size_line(FakeEngine("sd15"), gen, {**values, "layers": "nowhere"}, "fp8")
    assert "load a checkpoint" in estimate.record_size_line(None, gen, values, "fp8")
    hires = estimate.generation_p(None, {**gen, "enable_hr": True, "hr_resize_x": 128})
    assert (hires.hr_upscale_to_x, hires.hr_upscale_to_y) == (128, 128)
