"""RefDrop's DiT adapter against fakes: the generic site handler on an attention that asks for (B, heads, tokens, d)
out (PiD's joint attention), the refusal of Neo's context windows, Flux's image span when an edit's reference
tokens follow the image, and Image mode's encoding on a pixel-space family and on Neo's edit engines."""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.host.dit_attention import Site
from lib_imgcond.refdrop import families, forge_dit, forge_patch
from lib_imgcond.refdrop import forge_refdrop as host
from lib_imgcond.refdrop import layers as rd
from lib_imgcond.refdrop.reference import Reference
from lib_imgcond.refdrop.spec import SPEC
from tests.glue.fakes import FakeUnetPatcher

HEADS, DIM, N_TXT = 2, 8, 3
FAMILY = families.dit_family("pid", (1, 1), DIM)
VALUES = {
    "mode": "Record", "reference": "r", "coefficient": 0.5, "more_references": "", "layers": "all", "start": 0.0,
    "end": 1.0, "hires": False, "uncond": False, "save": False, "batch_item": 0,
}  # fmt: skip


def _attention_function(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **_kw):
    """Neo's `attention_function` contract: (B, heads, tokens, d) in with skip_reshape, and out with
    skip_output_reshape, else (B, tokens, heads·d)."""
    if not skip_reshape:
        q, k, v = (t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], -1, heads * out.shape[-1])


@pytest.fixture
def attn_module(monkeypatch):
    module = ModuleType("imgcond_fake_pixeldit")
    module.attention_function = _attention_function
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


class JointAttention(torch.nn.Module):
    """[text; image] joint attention calling its module's function for (B, heads, tokens, d) out, as PiD's does."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, q, k, v):
        out = self.module.attention_function(q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True)
        return out[:, :, N_TXT:]


class Model(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.joint, self.pixel = JointAttention(module), JointAttention(module)


def _site(module) -> Site:
    return Site(
        modules=lambda model: ([model.joint], [model.pixel]),
        functions=((module.__name__, "attention_function"),),
        span=lambda model, x, tokens: (tokens - x.shape[-2] * x.shape[-1], tokens),
        channels=lambda model: DIM,
    )


def _installed(module):
    model = Model(module)
    unet = FakeUnetPatcher(model)
    job = host.Job(dict(VALUES), FAMILY, frozenset(x[:3] for x in rd.layer_table(FAMILY)))
    job.record = Reference("r", FAMILY, {"trace": {}})
    tracker = forge_patch.PassTracker("first", 1)
    tracker.schedule = [1.0, 0.0]
    runner = forge_patch.Runner(job, tracker)
    forge_dit.install_site(unet, runner, _site(module), families.DIT["pid"].groups)
    runner.on_eval(1.0)
    return model, unet, runner


def test_a_heads_first_output_is_handed_back_as_the_host_gives_it(attn_module):
    model, unet, runner = _installed(attn_module)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, N_TXT + 4, DIM // HEADS, generator=g) for _ in range(3))
    plain = model.joint(q, k, v)
    x = torch.zeros(1, 3, 2, 2)  # a 2 × 2 image: 4 image tokens after the 3 text tokens

    def apply_model(x, t, **c):
        return model.joint(q, k, v)

    wrapper = unet.model_options["model_function_wrapper"]
    out = wrapper(apply_model, {"input": x, "timestep": torch.ones(1), "c": {"transformer_options": {}}})
    assert out.shape == plain.shape == (1, HEADS, 4, DIM // HEADS)
    assert torch.equal(out, plain)  # recording: the host's output, bit for bit, in the layout it asked for
    runner.flush()
    kv = runner.job.record.get(next(iter(runner.job.record)))
    assert tuple(kv[0].shape) == (1, 4, DIM)  # image tokens only, packed
    assert attn_module.attention_function is _attention_function  # the host's function is back


def test_context_windows_are_refused_by_name(attn_module):
    _, unet, _ = _installed(attn_module)
    wrapper = unet.model_options["model_function_wrapper"]
    args = {"input": torch.zeros(1, 3, 2, 2), "timestep": torch.ones(1)}
    args["c"] = {"transformer_options": {"context_window": object()}}
    label = r"PiD \(1 patch \+ 1 pixel blocks, 8 channels\)"
    with pytest.raises(ImgcondError, match=rf"RefDrop on {label}: .*context windows"):
        wrapper(lambda x, t, **c: x, args)
    assert attn_module.attention_function is _attention_function


@pytest.mark.parametrize(
    ("patch", "latent", "tokens", "span"),
    [
        (1, (4, 4), 12 + 16 + 15, (12, 28)),  # Flux.2: 1 × 1 patches, an edit's 15 reference tokens after the image
        (2, (8, 8), 12 + 16, (12, 28)),  # Flux.1: 2 × 2 patches, nothing after the image
        (None, (7, 9), 12 + 20, (12, 32)),  # Forge 2.0's Flux has no patch_size: 2 × 2, padded to whole patches
    ],
)
def test_flux_image_span_is_the_generated_image(patch, latent, tokens, span):
    model = SimpleNamespace() if patch is None else SimpleNamespace(patch_size=patch)
    assert forge_dit.image_span(model, torch.zeros(1, 16, *latent), 12, tokens) == span


def test_a_flux_call_too_short_for_its_image_is_an_error():
    with pytest.raises(ImgcondError, match="cannot hold 12 text and 16 image tokens"):
        forge_dit.image_span(SimpleNamespace(patch_size=1), torch.zeros(1, 128, 4, 4), 12, 20)


def _picture():
    return Image.new("RGB", (8, 4), (255, 0, 51))


def _engine(name: str, **attrs):
    return type(name, (), attrs)()


def test_image_mode_on_pid_takes_the_pixels_without_the_vae(monkeypatch):
    monkeypatch.setitem(sys.modules, "modules", None)  # importing the WebUI's VAE path would fail
    p = SimpleNamespace(sd_model=_engine("PiD"), width=8, height=4)
    latent = host.encode_image(p, _picture())
    assert latent.shape == (1, 3, 4, 8)
    assert torch.allclose(latent[0, :, 0, 0], torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1]))


def test_image_mode_leaves_an_edit_engines_references_as_they_were(monkeypatch):
    """Neo's Flux.2 / Flux Kontext engines keep what they encode as the next prompt's edit reference."""
    encoded = torch.ones(1, 128, 1, 2)

    class Flux2:
        ini_latent = None

        def __init__(self):
            self.ref_latents = [torch.zeros(1)]

        def encode_first_stage(self, x):
            self.ini_latent = encoded
            self.ref_latents.append(encoded)
            return encoded

    engine = Flux2()
    refs = engine.ref_latents
    fake = ModuleType("modules.sd_samplers_common")
    fake.images_tensor_to_samples = lambda t, model: model.encode_first_stage(t)
    monkeypatch.setitem(sys.modules, "modules", ModuleType("modules"))
    monkeypatch.setattr(sys.modules["modules"], "sd_samplers_common", fake, raising=False)
    monkeypatch.setitem(sys.modules, "modules.sd_samplers_common", fake)
    latent = host.encode_image(SimpleNamespace(sd_model=engine, width=8, height=4), _picture())
    assert torch.equal(latent, encoded)
    assert engine.ini_latent is None
    assert engine.ref_latents is refs and len(refs) == 1


def _pid_p(batch: int):
    blocks = SimpleNamespace(patch_blocks=[SimpleNamespace(attn=None)] * 2, pixel_blocks=[SimpleNamespace(attn=None)])
    model = SimpleNamespace(**vars(blocks), hidden_size=DIM, patch_size=16)
    engine = _engine("PiD", forge_objects=SimpleNamespace(unet=FakeUnetPatcher(model)))
    return SimpleNamespace(sd_model=engine, width=64, height=64, steps=3, batch_size=batch, sampler_name="", seed=1)


def test_image_mode_on_pid_needs_batch_size_1():
    values = SPEC.parse([{"mode": "Image", "reference": "r", "image": None}])
    with pytest.raises(ArgumentError, match=r"refdrop.mode='Image'.*Record or Use on PiD at batch size above 1"):
        host.plan(_pid_p(2), values, 0, False)
    with pytest.raises(ArgumentError, match=r"refdrop.image=None"):  # batch 1: past that check, to the image's
        host.plan(_pid_p(1), values, 0, False)
