"""Vision encoders on the host: the host's model management (faked as backend/memory_management.py and
backend/patcher/base.py document it), the shared models folders, and the per-job encodings cache."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from lib_imgcond.flexdiffuse import forge_encoders
from lib_imgcond.flexdiffuse import forge_flexdiffuse as flex
from lib_imgcond.host import capabilities as webui
from lib_imgcond.redux import forge_files as forge_redux_files
from lib_imgcond.redux import forge_redux
from lib_imgcond.redux.projector import ReduxProjector
from lib_imgcond.redux.spec import SPEC as REDUX_SPEC
from lib_imgcond.spec.params import ImageInput
from lib_imgcond.vision import forge_encoders as encoders
from lib_imgcond.vision.config import VisionConfig
from lib_imgcond.vision.transformer import VisionTransformer
from tests.glue import test_flexdiffuse_glue as flex_glue
from tests.glue.fakes import fake_p as flux_p
from tests.glue.test_flexdiffuse_glue import clip_state, fake_p, image, values, write

fake_forge = flex_glue.fake_forge  # autouse: models/ in a temporary folder, no encoder cache between tests


# --- fakes ------------------------------------------------------------------------------------------------------------
class FakeModelPatcher:
    """backend.patcher.base.ModelPatcher(model, load_device, offload_device): what both hosts take."""

    def __init__(self, model, load_device, offload_device, size=0, **kw):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device


LOAD_DEVICE = torch.device("cpu", 0)  # differs from the offload device, as a GPU would


class FakeMemoryManagement(types.ModuleType):
    """Records every load_models_gpu call and moves the models to their load device, as the host does; `neo` adds
    Neo's force_full_load parameter."""

    def __init__(self, neo: bool):
        super().__init__("backend.memory_management")
        self.calls: list[tuple[list, dict]] = []
        self.inside = False

        def load(models, kw):
            self.calls.append((list(models), kw))
            self.inside = True
            try:
                for patcher in models:
                    patcher.model.to(patcher.load_device)
            finally:
                self.inside = False

        if neo:

            def load_models_gpu(models, memory_required=0, force_patch_weights=False, force_full_load=False):
                load(models, {"force_full_load": force_full_load})

        else:

            def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
                load(models, {})

        self.load_models_gpu = load_models_gpu
        self.load_model_gpu = lambda model: load_models_gpu([model])
        self.text_encoder_device = lambda: LOAD_DEVICE
        self.text_encoder_offload_device = lambda: torch.device("cpu")
        self.should_use_fp16 = lambda *a, **k: False


@pytest.fixture(params=["forge", "neo"])
def managed_host(request, monkeypatch):
    """A host with model management: the fake modules in sys.modules and the capability probe answering for them."""
    neo = request.param == "neo"
    backend = sys.modules.get("backend") or types.ModuleType("backend")
    mm = FakeMemoryManagement(neo)
    patcher_pkg, base = types.ModuleType("backend.patcher"), types.ModuleType("backend.patcher.base")
    base.ModelPatcher = FakeModelPatcher
    patcher_pkg.base = base
    monkeypatch.setitem(sys.modules, "backend", backend)
    monkeypatch.setattr(backend, "memory_management", mm, raising=False)
    monkeypatch.setitem(sys.modules, "backend.memory_management", mm)
    monkeypatch.setitem(sys.modules, "backend.patcher", patcher_pkg)
    monkeypatch.setitem(sys.modules, "backend.patcher.base", base)
    caps = webui.Capabilities(patcher=True, model_management=True, full_load_flag=neo)
    monkeypatch.setattr(webui, "capabilities", lambda: caps)
    forge_encoders.unload_encoders()
    forge_redux_files._MODELS.clear()
    yield mm
    forge_encoders.unload_encoders()
    forge_redux_files._MODELS.clear()


@pytest.fixture
def no_module_moves(monkeypatch, managed_host):
    """Records our own moves of a vision module (`.to()` on it outside the host's load_models_gpu)."""
    moved = []
    real = torch.nn.Module.to

    def to(self, *a, **k):
        if isinstance(self, VisionTransformer | ReduxProjector) and not managed_host.inside:
            moved.append(type(self).__name__)
        return real(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    return moved


# --- memory management ------------------------------------------------------------------------------------------------
def test_probe_sees_model_management_and_neo_flag(monkeypatch):
    mm = FakeMemoryManagement(neo=True)
    monkeypatch.setitem(sys.modules, "backend.memory_management", mm)
    monkeypatch.setattr(webui, "_importable", lambda name: name in ("backend.patcher.unet", "backend.patcher.base"))
    caps = webui.probe()
    assert caps.model_management and caps.full_load_flag
    monkeypatch.setitem(sys.modules, "backend.memory_management", FakeMemoryManagement(neo=False))
    caps = webui.probe()
    assert caps.model_management and not caps.full_load_flag


def test_clip_encoder_is_loaded_through_the_hosts_model_management(fake_forge, managed_host, no_module_moves):
    write(fake_forge, "l.safetensors", clip_state())
    job = flex.plan(fake_p(), values(image=image()), [])
    model = forge_encoders.load_encoder(job.halves[0].path)
    assert isinstance(model.patcher, FakeModelPatcher) and model.patcher.model is model.module
    assert managed_host.calls, "the encoder ran without asking the host to load it"
    patchers, kw = managed_host.calls[-1]
    assert patchers == [model.patcher]
    neo = webui.capabilities().full_load_flag
    assert kw == ({"force_full_load": True} if neo else {})  # Neo: plain layers must not be loaded partially
    assert no_module_moves == []


def test_redux_models_are_loaded_together_through_the_host(tmp_path, monkeypatch, managed_host, no_module_moves):
    from lib_imgcond.host import forge

    monkeypatch.setattr(forge, "models_dir", lambda *parts: str(tmp_path.joinpath(*parts)))
    monkeypatch.setattr(forge_redux_files, "extra_dirs", lambda: [])
    os.makedirs(tmp_path / "imgcond" / "redux")
    save_tiny_siglip(tmp_path / "clip_vision" / "sigclip.safetensors")
    save(ReduxProjector(16, 32, 64), tmp_path / "imgcond" / "redux" / "redux.safetensors")
    p = flux_p("flux")
    job = forge_redux.plan(p, REDUX_SPEC.parse([{"image1": ImageInput(picture())}]))
    assert job.count == 81 and job.siglip == "sigclip.safetensors"
    (patchers, _kw) = managed_host.calls[-1]
    assert [type(x.model).__name__ for x in patchers] == ["VisionTransformer", "ReduxProjector"]
    assert no_module_moves == []


# --- folders ----------------------------------------------------------------------------------------------------------
def picture(seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(64, 96, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")


def save(module, path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    for prm in module.parameters():
        torch.nn.init.normal_(prm, 0.0, 0.05)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))


def save_tiny_siglip(path):
    save(VisionTransformer(VisionConfig("siglip", 16, 1, 1, 32, 384, 14, None, "gelu_tanh", "t")), path)


def test_shared_folders_are_listed_by_kind_and_loadable(fake_forge):
    models = fake_forge.parent.parent
    write(models / "clip_vision", "clip_l.safetensors", clip_state())
    write(models / "ControlNetPreprocessor" / "clip_vision" / "deep", "ip_l.safetensors", clip_state(seed=1))
    save_tiny_siglip(models / "clip_vision" / "sigclip.safetensors")
    write(models / "ControlNetPreprocessor", "depth.safetensors", {"model.diffusion_model.x": torch.zeros(2)})
    write(fake_forge, "own.safetensors", clip_state(seed=2))
    assert forge_encoders.list_encoders() == ["own.safetensors", "clip_l.safetensors", "ip_l.safetensors"]
    path, cfg = forge_encoders.resolve("ip_l.safetensors", "L", "sd15")
    assert path.endswith(os.path.join("ControlNetPreprocessor", "clip_vision", "deep", "ip_l.safetensors"))
    assert cfg.kind == "clip" and forge_encoders.load_encoder(path).config.proj_dim == 768
    assert "models/ControlNetPreprocessor" in forge_encoders.searched_dirs()[-1].replace(os.sep, "/")
    assert forge_redux_files.list_files("siglip") == ["sigclip.safetensors"]  # CLIP files are not offered there
    assert forge_redux_files.resolve("siglip", "").endswith("sigclip.safetensors")


def test_same_name_in_two_folders_shows_the_folder_and_a_file_found_twice_once(fake_forge):
    models = fake_forge.parent.parent
    write(fake_forge, "clip_l.safetensors", clip_state())
    write(models / "clip_vision", "clip_l.safetensors", clip_state(seed=1))
    (models / "ControlNetPreprocessor").mkdir()
    os.symlink(fake_forge / "clip_l.safetensors", models / "ControlNetPreprocessor" / "clip_l.safetensors")
    labels = forge_encoders.list_encoders()
    assert labels == ["clip_l.safetensors [imgcond/clip_vision]", "clip_l.safetensors [clip_vision]"]
    assert forge_encoders.list_encoders() == labels  # stable
    path, _ = forge_encoders.resolve(labels[1], "L", "sd15")
    assert path == str(models / "clip_vision" / "clip_l.safetensors")
    assert forge_encoders.resolve("clip_l.safetensors", "L", "sd15")[0] == str(
        fake_forge / "clip_l.safetensors"
    )  # the first
    job = flex.plan(fake_p(), values(image=image(), encoder=labels[1]), [])
    assert job.encoder_names == {"encoder": labels[1]}  # the infotext names the choice, which pastes back


# --- encodings cache --------------------------------------------------------------------------------------------------
def test_an_image_is_encoded_once_per_job(fake_forge, monkeypatch):
    write(fake_forge, "l.safetensors", clip_state())
    calls = []
    real = VisionTransformer.forward
    monkeypatch.setattr(VisionTransformer, "forward", lambda self, x: calls.append(1) or real(self, x))
    p = fake_p()
    same = image(seed=3)
    first = flex.plan(p, values(image=same, image2=image(seed=3)), [])  # equal pixels, different objects
    assert len(calls) == 1
    torch.testing.assert_close(first.halves[0].tokens[0][0], first.halves[0].tokens[1][0])
    again = flex.plan(p, values(image=same, weight=0.5), [])  # the same job again (hires pass, batch count)
    assert len(calls) == 1
    torch.testing.assert_close(again.halves[0].tokens[0][0], first.halves[0].tokens[0][0])
    flex.plan(p, values(image=same, compatible=True), [])  # other preprocessing: encoded
    assert len(calls) == 2
    encoders.end_job(p)
    flex.plan(p, values(image=same), [])
    assert len(calls) == 3
    flex.plan(fake_p(), values(image=same), [])  # a new job
    assert len(calls) == 4


def test_the_cache_is_bounded_and_owned_by_its_job(monkeypatch):
    p = fake_p()
    cache = encoders.job_encodings(p)
    assert encoders.job_encodings(p) is cache
    for i in range(encoders.MAX_ENCODINGS + 5):
        cache.get(("k", i), lambda i=i: i)
    assert len(cache.items) == encoders.MAX_ENCODINGS and ("k", 0) not in cache.items
    import copy

    cell = copy.copy(p)  # X/Y/Z copies the processing object per cell: it shares the state dict, not the cache
    assert encoders.job_encodings(cell) is not cache
    assert encoders.content_hash(torch.zeros(2, 3)) != encoders.content_hash(torch.zeros(3, 2))
