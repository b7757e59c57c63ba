"""Style model glue (style/forge_style + the spec) against fakes of Forge's documented API."""

from __future__ import annotations

import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.flexdiffuse import forge_encoders
from lib_imgcond.host import forge
from lib_imgcond.redux import forge_redux
from lib_imgcond.redux import image as redux_image
from lib_imgcond.spec.params import ImageInput
from lib_imgcond.style import adapter as sa
from lib_imgcond.style import forge_style as host
from lib_imgcond.style.spec import SLOTS, SPEC
from lib_imgcond.vision import transformer as vision
from tests.glue.fakes import FakeUnetPatcher, fake_models_dir
from tests.vision_states import clip_shapes, random_state, style_adapter_shapes

WIDTH = 32


class FakeCondition:
    def __init__(self, cond):
        self.cond = cond


class FakePredictor:
    def percent_to_sigma(self, percent):
        return 999999999.9 if percent <= 0 else 0.0 if percent >= 1 else 10.0 * (1.0 - percent)


class Engine:
    def __init__(self, family="sd15"):
        self.is_sd1, self.is_sdxl, self.is_sd2, self.is_sd3 = family == "sd15", family == "sdxl", False, False


def fake_p(family="sd15"):
    return SimpleNamespace(sd_model=Engine(family), is_hr_pass=False, extra_generation_params={})


def sdpa_kernel(q, k, v, heads):
    b, n, inner = q.shape
    qh, kh, vh = (t.reshape(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, n, inner)


@pytest.fixture(autouse=True)
def models(monkeypatch, tmp_path):
    root = tmp_path / "models"
    fake_models_dir(monkeypatch, root)
    monkeypatch.setattr(forge, "attention_kernel", lambda: sdpa_kernel)
    condition = types.ModuleType("backend.sampling.condition")
    condition.ConditionCrossAttn = FakeCondition
    for name in ("backend", "backend.sampling"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "backend.sampling.condition", condition)
    forge_redux._STRICT_CLASS.clear()
    forge_encoders.unload_encoders()
    host._ADAPTER.clear()
    yield root
    forge_redux._STRICT_CLASS.clear()
    forge_encoders.unload_encoders()


def adapter_state(width=WIDTH, seed=0):
    state = random_state(style_adapter_shapes(width, 8, 1, 768), seed, 0.2)
    for key in state:
        if "ln_" in key and key.endswith(".weight"):  # LayerNorm gains
            state[key] = 1.0 + state[key]
    return state


def save(root, folder, name, state):
    from safetensors.torch import save_file

    path = root.joinpath(*folder, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return str(path)


def files(root, adapter="style.safetensors", hidden=WIDTH):
    save(root, ("imgcond", "clip_vision"), "l.safetensors", random_state(clip_shapes(hidden, 1, 64, 14, 3, 768), 1))
    return save(root, ("imgcond", "style"), adapter, adapter_state())


def picture(seed=0, size=(50, 40)):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


def values(**kw):
    return SPEC.parse([{"image1": ImageInput(picture()), **kw}])


def entry(t):
    return {"cross_attn": t, "model_conds": {"c_crossattn": FakeCondition(t)}}


def installed(job):
    unet = FakeUnetPatcher()
    unet.model.predictor = FakePredictor()
    return unet, host.install(unet, job)


def modify(unet, cond, uncond=None, sigma=5.0):
    (mod,) = unet.model_options["conditioning_modifiers"]
    return mod("model", None, torch.tensor([sigma]), uncond, cond, 7.0, {}, 1)


# --- spec -----------------------------------------------------------------------------------------------------------
def test_spec_layout_and_axes():
    names = [p.name for p in SPEC.params]
    assert names[:8] == ["encoder", "adapter", "strength_type", "strength", "margin", "start", "end", "hires"]
    assert names[8:11] == ["image1", "weight1", "mode1"] and len(names) == 8 + 4 * SLOTS
    assert names[8 + 3 * SLOTS :] == [f"mask{k}" for k in range(1, SLOTS + 1)]  # appended: positional calls keep
    axes = {p.name for p in SPEC.params if p.xyz}
    assert axes == {"strength", "start", "end", *(f"weight{k}" for k in range(1, SLOTS + 1))}
    assert SPEC.title.lower() == "style model" and SPEC.enabled_key == "style_model_enabled"


# --- planning ---------------------------------------------------------------------------------------------------------
def test_plan_refuses_other_families_and_bad_input(models):
    with pytest.raises(ImgcondError, match=r"Style model needs a SD1\.5 model, but the loaded checkpoint is SDXL"):
        host.plan(fake_p("sdxl"), values())
    with pytest.raises(ImgcondError, match="no style image was given"):
        host.plan(fake_p(), SPEC.parse([{}]))
    with pytest.raises(ArgumentError, match=r"style_model\.end"):
        host.plan(fake_p(), values(start=0.5, end=0.2))
    with pytest.raises(ImgcondError, match=r"ViT-L/14 vision encoder.*none is in .*imgcond/clip_vision"):
        host.plan(fake_p(), values())
    save(models, ("imgcond", "clip_vision"), "l.safetensors", random_state(clip_shapes(WIDTH, 1, 64, 14, 3, 768)))
    with pytest.raises(ImgcondError, match=r"none is in .*imgcond/style or .*ControlNet"):
        host.plan(fake_p(), values())
    with pytest.raises(ImgcondError, match=r"'nope\.pth' is not in .*imgcond/style or .*ControlNet"):
        host.plan(fake_p(), values(adapter="nope.pth"))
    save(models, ("imgcond", "style"), "a.safetensors", adapter_state())
    with pytest.raises(ImgcondError, match="image 1: autocrop needs a mask"):
        host.plan(fake_p(), values(mode1="autocrop"))


def test_pth_must_be_a_plain_state_dict(models):
    files(models)
    save(models, ("imgcond", "style"), "plain.pth", adapter_state())
    assert host.plan(fake_p(), values(adapter="plain.pth")).count == 8
    save(models, ("imgcond", "style"), "nested.pth", {"state_dict": adapter_state(), "epoch": 3})
    with pytest.raises(ImgcondError, match=r"nested\.pth is not a plain state dict of tensors"):
        host.plan(fake_p(), values(adapter="nested.pth"))
    save(models, ("imgcond", "style"), "pickled.pth", {"weights": SimpleNamespace(a=1)})
    with pytest.raises(ImgcondError, match=r"pickled.pth is not a plain state dict: torch.load\(weights_only=True\)"):
        host.plan(fake_p(), values(adapter="pickled.pth"))
    save(models, ("imgcond", "style"), "redux.safetensors", {"redux_up.weight": torch.zeros(2, 2)})
    with pytest.raises(ImgcondError, match="not a T2I-Adapter style model"):
        host.plan(fake_p(), values(adapter="redux.safetensors"))


def test_encoder_width_must_fit_the_adapter(models):
    save(models, ("imgcond", "clip_vision"), "l.safetensors", random_state(clip_shapes(48, 1, 64, 14, 3, 768)))
    save(models, ("imgcond", "style"), "s.safetensors", adapter_state())
    with pytest.raises(ImgcondError, match=r"takes 32-d CLIP vision states but l\.safetensors gives 48-d"):
        host.plan(fake_p(), values())


def test_controlnet_folder_lists_style_files_only(models):
    save(models, ("ControlNet",), "control_canny.safetensors", {"x": torch.zeros(1)})
    save(models, ("ControlNet",), "t2iadapter_style_sd14v1.pth", adapter_state())
    assert host.list_adapters() == ["t2iadapter_style_sd14v1.pth"]
    files(models, "mine.safetensors")
    assert host.list_adapters() == ["mine.safetensors", "t2iadapter_style_sd14v1.pth"]


def expected_tokens(models, image, mask=None):
    """What the adapter makes of one image, computed from the core pieces directly."""
    encoder = vision.load_vision_model(
        random_state(clip_shapes(WIDTH, 1, 64, 14, 3, 768), 1), source="l"
    )  # the same file contents
    adapter = sa.load_style_adapter(adapter_state())
    from lib_imgcond.redux import tokens as rx

    img, m = redux_image.prepare(forge_redux.pil_to_tensor(image), mask, "center_crop", 42, 0.1, patch=14)
    hidden = encoder(vision.preprocess(img[None], encoder.config)).last_hidden_state
    return adapter(sa.select_tokens(hidden, None if m is None else rx.token_mask(m, 14)))


def test_tokens_per_image_weight_and_strength(models):
    files(models)
    one = host.plan(fake_p(), values())
    assert one.tokens.shape == (1, 8, 768) and one.encoder == "l.safetensors" and one.adapter == "style.safetensors"
    assert torch.allclose(one.tokens, expected_tokens(models, picture()), atol=1e-5)
    two = host.plan(fake_p(), values(image3=ImageInput(picture(1)), weight3=0.5, strength=2.0))
    assert two.tokens.shape == (1, 16, 768)
    assert torch.allclose(two.tokens[:, :8], 2.0 * one.tokens, atol=1e-5)
    assert torch.allclose(two.tokens[:, 8:], expected_tokens(models, picture(1)), atol=1e-5)  # 0.5 × 2
    biased = host.plan(fake_p(), values(strength_type="attn_bias", strength=3.0))
    assert torch.equal(biased.tokens, one.tokens) and biased.bias_strength == 3.0


def test_weight_or_strength_zero_patches_nothing(models):
    files(models)
    for kw in ({"weight1": 0.0}, {"strength": 0.0}, {"strength": 0.0, "strength_type": "attn_bias"}):
        job = host.plan(fake_p(), values(**kw))
        unet, state = installed(job)
        assert job.count == 0 and state is None and unet.model_options == {"transformer_options": {}}, kw


def test_mask_selects_the_tokens_it_covers(models):
    files(models)
    mask = Image.new("L", (50, 40), 0)
    mask.paste(255, (0, 0, 20, 40))
    masked = host.plan(fake_p(), SPEC.parse([{"image1": ImageInput(picture(), mask)}]))
    plain = host.plan(fake_p(), values())
    assert masked.count == 8 and not torch.allclose(masked.tokens, plain.tokens)
    expected = expected_tokens(models, picture(), forge_redux.mask_to_tensor(mask))
    assert torch.allclose(masked.tokens, expected, atol=1e-5)


def test_uploaded_or_painted_mask_goes_the_same_way_and_wins(models):
    """`maskk` (the panel's mask upload, which the brush fills too) gives the tokens of the same mask carried by the
    image, and wins over a mask the image carries."""
    files(models)
    mask = Image.new("L", (50, 40), 0)
    mask.paste(255, (0, 0, 20, 40))
    carried = host.plan(fake_p(), SPEC.parse([{"image1": ImageInput(picture(), mask)}]))
    rgb = mask.convert("RGB")  # an uploaded mask arrives as an RGB image
    uploaded = host.plan(fake_p(), SPEC.parse([{"image1": ImageInput(picture()), "mask1": rgb}]))
    assert torch.equal(uploaded.tokens, carried.tokens)
    other = Image.new("L", (50, 40), 0)
    other.paste(255, (30, 0, 50, 40))
    wins = host.plan(fake_p(), SPEC.parse([{"image1": ImageInput(picture(), other), "mask1": rgb}]))
    assert torch.equal(wins.tokens, carried.tokens)
    assert not torch.allclose(host.plan(fake_p(), values()).tokens, carried.tokens)


# --- the patches ------------------------------------------------------------------------------------------------------
def test_modifier_appends_to_cond_only_inside_the_window(models):
    files(models)
    job = host.plan(fake_p(), values(start=0.2, end=0.6))  # sigma 8 … 4 with the fake predictor
    unet, state = installed(job)
    ctx, uctx = torch.randn(2, 77, 768), torch.randn(2, 77, 768)
    out = modify(unet, [entry(ctx)], [entry(uctx)], sigma=5.0)
    got = out[4][0]["model_conds"]["c_crossattn"].cond
    assert state.active and got.shape == (2, 85, 768) and torch.equal(got[:, :77], ctx)
    assert torch.equal(got[1, 77:], job.tokens[0]) and out[3][0]["model_conds"]["c_crossattn"].cond is uctx
    assert not out[4][0]["model_conds"]["c_crossattn"].can_concat(out[3][0]["model_conds"]["c_crossattn"])
    for sigma in (9.0, 3.0):
        cond = [entry(ctx)]
        assert modify(unet, cond, sigma=sigma)[4] is cond and not state.active


def test_empty_window_never_appends(models):
    files(models)
    unet, state = installed(host.plan(fake_p(), values(start=0.0, end=0.0)))
    for sigma in (999999999.9, 14.6, 0.0):
        cond = [entry(torch.randn(1, 77, 768))]
        assert modify(unet, cond, sigma=sigma)[4] is cond and not state.active


def test_attention_bias_on_the_style_columns_of_cond_rows(models):
    files(models)
    job = host.plan(fake_p(), values(strength_type="attn_bias", strength=0.5))
    unet, state = installed(job)
    replaces = unet.model_options["transformer_options"]["patches_replace"]["attn2"]
    attn2 = replaces[("input", 1, 0)]
    assert getattr(attn2, "_imgcond", False)
    q, k, v = torch.randn(2, 16, 64), torch.randn(2, 85, 64), torch.randn(2, 85, 64)
    opts = {"n_heads": 4, "cond_or_uncond": [0]}
    state.active = False
    assert torch.allclose(attn2(q, k, v, opts), sdpa_kernel(q, k, v, 4))
    state.active = True
    got = attn2(q, k, v, opts)
    qh, kh, vh = (t.reshape(2, -1, 4, 16).transpose(1, 2) for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) / 4.0
    scores[..., 77:] += torch.log(torch.tensor(0.5))
    manual = (scores.softmax(-1) @ vh).transpose(1, 2).reshape(2, 16, 64)
    assert torch.allclose(got, manual, atol=1e-5) and not torch.allclose(got, sdpa_kernel(q, k, v, 4), atol=1e-4)
    uncond_only = attn2(q, k[:, :77], v[:, :77], {"n_heads": 4, "cond_or_uncond": [1]})
    assert torch.allclose(uncond_only, sdpa_kernel(q, k[:, :77], v[:, :77], 4))
    bias = host.key_bias(job, [1, 0], 4, 85, torch.float32, "cpu")
    assert torch.equal(bias[:2], torch.zeros(2, 1, 1, 85)) and torch.all(bias[2:, ..., 77:] < 0)


def test_attention_bias_refuses_another_extensions_attn2_replace(models):
    files(models)
    job = host.plan(fake_p(), values(strength_type="attn_bias", strength=2.0))
    unet = FakeUnetPatcher()
    unet.model.predictor = FakePredictor()
    unet.set_model_patch_replace(lambda q, k, v, extra: q, "attn2", "input", 1)
    host.install(unet, job)
    refuse = unet.model_options["conditioning_modifiers"][-1]
    with pytest.raises(ImgcondError, match="cannot be combined with another extension's cross-attention replace"):
        refuse("model", None, torch.tensor([5.0]), None, [], 7.0, {}, 1)


def test_infotext_names_the_files_and_used_slots_only(models):
    files(models)
    job = host.plan(fake_p(), values(image2=ImageInput(picture(2)), weight2=0.4))
    info = host.infotext(job, SPEC)
    assert info["style_model_enabled"] is True and info["style_model_adapter"] == "style.safetensors"
    assert info["style_model_encoder"] == "l.safetensors" and info["style_model_weight2"] == 0.4
    assert "style_model_weight3" not in info and "style_model_margin" not in info
    assert SPEC.paste({k: str(v) for k, v in info.items()})["weight2"] == 0.4
    assert os.path.basename(host.resolve_adapter("")) == "style.safetensors"
