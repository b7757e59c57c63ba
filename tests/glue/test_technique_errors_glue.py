"""Every error of a shared helper names the technique the user enabled (issue 28, item 5).

CLIP image guidance, Style model and unCLIP share the CLIP vision encoder resolver and loader
(`flexdiffuse/forge_encoders.py`), the model-family refusal (`host/forge.require_family`) and the step window check
(`common/window.check`). Each error path is driven here through the technique's own entry point (`plan`), and the
message must name that technique (its accordion title, or its argument prefix for an ArgumentError) and no other.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.flexdiffuse import forge_encoders
from lib_imgcond.flexdiffuse import forge_flexdiffuse as flex_host
from lib_imgcond.flexdiffuse.spec import SPEC as FLEX_SPEC
from lib_imgcond.spec.params import ImageInput
from lib_imgcond.style import forge_style as style_host
from lib_imgcond.style.spec import SPEC as STYLE_SPEC
from lib_imgcond.unclip import forge_unclip as unclip_host
from lib_imgcond.unclip.spec import SPEC as UNCLIP_SPEC
from tests.glue.fakes import FakeUnetPatcher, fake_models_dir
from tests.vision_states import clip_shapes, random_state, style_adapter_shapes

TITLES = ("RefDrop", "Redux", "Hires iterative mixing", "CLIP image guidance", "Style model", "unCLIP")
PREFIXES = ("refdrop.", "redux.", "hrmix.", "flexdiffuse.", "style_model.", "unclip.")
HIDDEN = 32


class FakeCondition:
    def __init__(self, cond):
        self.cond = cond


class SD15:
    def __init__(self):
        self.is_sd1, self.is_sdxl, self.is_sd2, self.is_sd3 = True, False, False, False
        unet = FakeUnetPatcher()
        unet.model.predictor = SimpleNamespace(percent_to_sigma=lambda p: 999.0 if p <= 0 else 10.0 * (1 - p))
        self.forge_objects = SimpleNamespace(unet=unet)


class Flux:
    pass


class StableDiffusion2:
    """The engine class name Forge 2.0 gives SD2.x checkpoints; an unCLIP-h UNet (ADM input 2048)."""

    def __init__(self, filename):
        diffusion = SimpleNamespace(
            num_classes="sequential", label_emb=nn.Sequential(nn.Sequential(nn.Linear(2048, 4)))
        )
        unet = FakeUnetPatcher(diffusion)
        unet.model.predictor = SimpleNamespace(percent_to_sigma=lambda p: 999.0 if p <= 0 else 10.0 * (1 - p))
        self.forge_objects = SimpleNamespace(unet=unet)
        self.filename = str(filename)


def picture() -> ImageInput:
    g = torch.Generator().manual_seed(0)
    return ImageInput(Image.fromarray((torch.rand(40, 50, 3, generator=g) * 255).to(torch.uint8).numpy()))


def clip(proj: int, **extra) -> dict[str, torch.Tensor]:
    return {**random_state(clip_shapes(HIDDEN, 1, 64, 14, 3, proj), 1), **extra}


@dataclass
class Technique:
    title: str
    prefix: str
    proj: int  # the projection its SD1.5 (or unCLIP-h) model needs
    other_proj: int  # a projection it refuses
    run: Any  # (root, tmp_path, family, **values) → plan(...)


def _flex(root, tmp_path, family, **kw):
    p = SimpleNamespace(sd_model=Flux() if family else SD15(), is_hr_pass=False, extra_generation_params={}, steps=3)
    return flex_host.plan(p, FLEX_SPEC.parse([{"image": picture(), **kw}]), [])


def _style(root, tmp_path, family, **kw):
    state = random_state(style_adapter_shapes(HIDDEN, 8, 1, 768), 0, 0.2)
    folder = root / "imgcond" / "style"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "a.safetensors"))
    p = SimpleNamespace(sd_model=Flux() if family else SD15(), is_hr_pass=False, extra_generation_params={})
    return style_host.plan(p, STYLE_SPEC.parse([{"image1": picture(), **kw}]))


def _unclip(root, tmp_path, family, **kw):
    g = torch.Generator().manual_seed(3)
    ckpt = tmp_path / "sd21-unclip-h.safetensors"
    augmentor = {
        "noise_augmentor.data_mean": torch.randn(1, 1024, generator=g) * 0.1,
        "noise_augmentor.data_std": torch.full((1, 1024), 0.8),
    }
    save_file(augmentor, str(ckpt))
    engine = Flux() if family else StableDiffusion2(ckpt)
    p = SimpleNamespace(sd_model=engine, all_seeds=[7], extra_generation_params={})
    return unclip_host.plan(p, UNCLIP_SPEC.parse([{"image1": picture(), **kw}]))


TECHNIQUES = [
    Technique("CLIP image guidance", "flexdiffuse", 768, 1024, _flex),
    Technique("Style model", "style_model", 768, 1024, _style),
    Technique("unCLIP", "unclip", 1024, 768, _unclip),
]


@pytest.fixture(autouse=True)
def root(monkeypatch, tmp_path):
    root = tmp_path / "models"
    fake_models_dir(monkeypatch, root)
    condition = types.ModuleType("backend.sampling.condition")
    condition.ConditionCrossAttn = condition.Condition = FakeCondition
    for name in ("backend", "backend.sampling"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "backend.sampling.condition", condition)
    forge_encoders.unload_encoders()
    style_host._ADAPTER.clear()
    yield root
    forge_encoders.unload_encoders()


def encoder_dir(root):
    folder = root / "imgcond" / "clip_vision"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def names_only(message: str, t: Technique) -> None:
    """`message` names `t` (title or argument prefix) and no other technique."""
    assert t.title in message or f"{t.prefix}." in message, message
    others = [x for x in TITLES if x != t.title and x not in t.title and x in message.replace(t.title, "")]
    assert not others, (others, message)
    assert not [x for x in PREFIXES if x != f"{t.prefix}." and x in message], message


def error(t: Technique, root, tmp_path, cls=ImgcondError, family=None, **values) -> str:
    with pytest.raises(cls) as e:
        t.run(root, tmp_path, family, **values)
    names_only(str(e.value), t)
    return str(e.value)


@pytest.fixture(params=TECHNIQUES, ids=lambda t: t.prefix)
def t(request):
    return request.param


def test_model_family_refusal_names_the_technique(t, root, tmp_path):
    assert error(t, root, tmp_path, family="flux").startswith(f"{t.title} needs ")


def test_step_window_names_the_techniques_argument(t, root, tmp_path):
    assert error(t, root, tmp_path, ArgumentError, start=0.6, end=0.2).startswith(f"{t.prefix}.end=")


def test_no_encoder_file_names_the_technique(t, root, tmp_path):
    msg = error(t, root, tmp_path)
    assert msg.startswith(f"{t.title} needs a ") and "vision encoder" in msg and "clip_vision" in msg


def test_missing_encoder_file_names_the_technique(t, root, tmp_path):
    save_file(clip(t.proj), str(encoder_dir(root) / "ok.safetensors"))
    msg = error(t, root, tmp_path, encoder="missing.safetensors")
    assert msg.startswith(f"{t.title}: the encoder file 'missing.safetensors' (encoder) is not in ")


def test_encoder_choice_with_a_folder_names_the_techniques_argument(t, root, tmp_path):
    msg = error(t, root, tmp_path, ArgumentError, encoder="../x.safetensors")
    assert msg.startswith(f"{t.prefix}.encoder='../x.safetensors'") and "no folders" in msg


def test_unreadable_encoder_file_names_the_technique(t, root, tmp_path):
    (encoder_dir(root) / "broken.safetensors").write_bytes(b"not a file")
    msg = error(t, root, tmp_path, encoder="broken.safetensors")
    assert msg.startswith(f"{t.title}: cannot read broken.safetensors as a .safetensors file")


def test_not_a_vision_encoder_names_the_technique(t, root, tmp_path):
    save_file({"model.diffusion_model.x": torch.zeros(2)}, str(encoder_dir(root) / "unet.safetensors"))
    msg = error(t, root, tmp_path, encoder="unet.safetensors")
    assert msg.startswith(f"{t.title}: unet.safetensors") and "Stable Diffusion checkpoint" in msg


def test_wrong_projection_names_the_technique(t, root, tmp_path):
    save_file(clip(t.other_proj), str(encoder_dir(root) / "other.safetensors"))
    msg = error(t, root, tmp_path, encoder="other.safetensors")
    assert msg.startswith(t.title) and f"{t.other_proj}-d" in msg and f"{t.proj}-d" in msg


def test_encoder_that_fails_to_load_names_the_technique(t, root, tmp_path):
    state = clip(t.proj, **{"vision_model.stray.weight": torch.zeros(2)})  # a fine header, an unexpected tensor
    save_file(state, str(encoder_dir(root) / "stray.safetensors"))
    msg = error(t, root, tmp_path, encoder="stray.safetensors")
    assert msg.startswith(f"{t.title}: stray.safetensors does not match") and "vision_model.stray.weight" in msg
