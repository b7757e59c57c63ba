"""CLIP image guidance (FlexDiffuse) glue against small fakes of Forge's documented API (no Forge, no Gradio)."""

from __future__ import annotations

import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.flexdiffuse import forge_encoders
from lib_imgcond.flexdiffuse import forge_flexdiffuse as host
from lib_imgcond.flexdiffuse import guidance as fd
from lib_imgcond.flexdiffuse.spec import AUTO, SPEC, split_images
from lib_imgcond.host import forge
from lib_imgcond.spec.params import ImageInput
from tests.glue.fakes import FakeUnetPatcher, fake_models_dir
from tests.vision_states import clip_shapes, random_state

P = "vision_model."


# --- fakes ----------------------------------------------------------------------------------------------------------
class FakeCondition:
    """backend.sampling.condition.ConditionCrossAttn: holds `.cond`."""

    def __init__(self, cond):
        self.cond = cond


class FakePredictor:
    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return 10.0 * (1.0 - percent)


class FakeEngine:
    """An SD1.5 / SDXL engine: family flags, a patcher, and a text encoder that records what it was asked."""

    def __init__(self, family="sd15", name=None):
        self.is_sd1, self.is_sdxl, self.is_sd2, self.is_sd3 = family == "sd15", family == "sdxl", False, False
        unet = FakeUnetPatcher()
        unet.model.predictor = FakePredictor()
        self.forge_objects = SimpleNamespace(unet=unet)
        self.family = family
        self.prompts: list[list[str]] = []
        self.dim = 2048 if family == "sdxl" else 768

    def get_learned_conditioning(self, prompts):
        self.prompts.append(list(prompts))
        g = torch.Generator().manual_seed(sum(map(ord, prompts[0])))
        emb = torch.randn(len(prompts), 77, self.dim, generator=g)
        if self.family == "sdxl":
            return {"crossattn": emb, "vector": torch.zeros(len(prompts), 2816)}
        return emb


class Flux(FakeEngine):
    def __init__(self):
        super().__init__("flux")


def fake_p(family="sd15"):
    engine = Flux() if family == "flux" else FakeEngine(family)
    return SimpleNamespace(sd_model=engine, is_hr_pass=False, enable_hr=False, extra_generation_params={}, steps=3)


@pytest.fixture(autouse=True)
def fake_forge(monkeypatch, tmp_path):
    """models_dir → a temporary folder; backend.sampling.condition → FakeCondition; no model cache between tests."""
    root = tmp_path / "models"
    fake_models_dir(monkeypatch, root)
    backend = types.ModuleType("backend")
    sampling = types.ModuleType("backend.sampling")
    condition = types.ModuleType("backend.sampling.condition")
    condition.ConditionCrossAttn = FakeCondition
    backend.sampling, sampling.condition = sampling, condition
    for name, mod in (("backend", backend), ("backend.sampling", sampling), ("backend.sampling.condition", condition)):
        monkeypatch.setitem(sys.modules, name, mod)
    forge_encoders.unload_encoders()
    yield root / "imgcond" / "clip_vision"
    forge_encoders.unload_encoders()


# --- encoder files ----------------------------------------------------------------------------------------------------
def clip_state(hidden=32, layers=2, mlp=64, patch=14, grid=3, proj=768, seed=0) -> dict[str, torch.Tensor]:
    """A random CLIPVisionModelWithProjection state dict in the Hugging Face key layout."""
    return random_state(clip_shapes(hidden, layers, mlp, patch, grid, proj), seed)


def write(folder, name, state):
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), name)
    save_file(state, path)
    return path


def image(seed=0, size=(40, 48)) -> ImageInput:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return ImageInput(Image.fromarray(arr))


def values(**kw):
    out = SPEC.parse([{"image": None, **kw}])
    return out


def cond_entry(tensor):
    return {"cross_attn": tensor, "model_conds": {"c_crossattn": FakeCondition(tensor)}}


def run_modifier(unet, cond, uncond=None, sigma=5.0):
    mods = unet.model_options["conditioning_modifiers"]
    args = ("model", torch.zeros(1, 4, 8, 8), torch.tensor([sigma]), uncond, cond, 7.0, {}, 1)
    for mod in mods:
        args = mod(*args)
    return args


# --- spec -------------------------------------------------------------------------------------------------------------
def test_spec_defaults_and_xyz_axes():
    d = SPEC.defaults()
    assert (d["threshold_mult"], d["threshold_floor"], d["linear_start"], d["linear_end"]) == (0.25, 0.75, 0.1, 0.5)
    assert (d["clustered"], d["max_guidance"], d["header_max"], d["concept_threshold"]) == (0.15, 0.35, 0.0, 0.9)
    assert d["compatible"] is False and d["priority"] == "Best fit" and d["reuse"] is True
    axes = {"threshold_mult", "linear_end", "clustered", "max_guidance", "start", "end"}
    assert {p.name for p in SPEC.params if p.xyz} == axes
    assert SPEC.title.lower() == "clip image guidance" and SPEC.prefix == "flexdiffuse"
    assert "multiplier" in SPEC.by_name["threshold_mult"].label.lower()


def test_positional_and_named_args_agree():
    named = SPEC.parse([{"linear_end": 0.2, "priority": "text order"}])
    names = ["enabled", *SPEC.by_name]
    positional = SPEC.parse([named[n] for n in names])
    assert named == positional and named["priority"] == "Text order"
    with pytest.raises(ArgumentError, match=r"flexdiffuse\.clustered=0\.9"):
        SPEC.parse([{"clustered": 0.9}])
    with pytest.raises(ArgumentError, match=r"flexdiffuse\.imagez"):
        SPEC.parse([{"imagez": 1}])


def test_split_images_list():
    from tests.e2e.forge import encode

    arr = (torch.rand(20, 20, 3) * 255).to(torch.uint8).numpy()
    args, extra = split_images([{"images": [encode(arr), {"image": encode(arr), "weight": 0.5}], "clustered": 0}])
    assert args == [{"clustered": 0}] and [w for _, w in extra] == [1.0, 0.5]
    assert extra[0][0].image.size == (20, 20)
    assert split_images([True, None]) == ([True, None], [])
    with pytest.raises(ArgumentError, match=r"flexdiffuse\.images\[0\]\.weight"):
        split_images([{"images": [{"image": encode(arr), "weight": 5}]}])
    with pytest.raises(ArgumentError, match=r"flexdiffuse\.images\[0\]"):
        split_images([{"images": [None]}])
    with pytest.raises(ArgumentError, match=r"flexdiffuse\.images"):
        split_images([{"images": "abc"}])


def test_infotext_round_trip(fake_forge):
    write(fake_forge, "clip_vision_l.safetensors", clip_state())
    v = values(image=image(), concept="cat, dog", linear_end=0.3)
    job = host.plan(fake_p(), v, [])
    info = host.infotext(job, SPEC)
    assert info["flexdiffuse_enabled"] is True and info["flexdiffuse_encoder"] == "clip_vision_l.safetensors"
    assert "flexdiffuse_encoder_g" not in info and "flexdiffuse_weight2" not in info
    assert "flexdiffuse_image" not in info
    pasted = SPEC.paste({k: str(v) for k, v in info.items()})
    assert pasted["linear_end"] == 0.3 and pasted["concept"] == "cat, dog" and pasted["compatible"] is False


# --- files and checks -------------------------------------------------------------------------------------------------
def test_list_and_auto_pick_by_projection(fake_forge, tmp_path):
    write(fake_forge, "a_vith.safetensors", clip_state(proj=1024))
    write(fake_forge, "b_small_l.safetensors", clip_state(proj=768))
    (fake_forge / "notes.txt").write_text("x")
    extra = tmp_path / "extra"
    write(extra, "c_bigg.safetensors", clip_state(proj=1280))
    assert forge_encoders.list_encoders() == ["a_vith.safetensors", "b_small_l.safetensors"]
    assert forge_encoders.list_encoders(str(extra))[-1] == "c_bigg.safetensors"
    path, cfg = forge_encoders.resolve(AUTO, "L", "sd15")
    assert os.path.basename(path) == "b_small_l.safetensors" and cfg.proj_dim == 768
    path, _ = forge_encoders.resolve("", "G", "sdxl", str(extra))
    assert os.path.basename(path) == "c_bigg.safetensors"
    with pytest.raises(ImgcondError, match=r"ViT-bigG/14 vision encoder \(1280-d projection\) for SDXL.*clip_vision"):
        forge_encoders.resolve(AUTO, "G", "sdxl")
    with pytest.raises(ImgcondError, match=r"found only a_vith\.safetensors: clip-vit-h32-l2-p14-42, 1024-d; b_small"):
        forge_encoders.resolve(AUTO, "G", "sdxl")


def test_wrong_tower_is_a_clear_error(fake_forge):
    write(fake_forge, "CLIP-ViT-H-14.safetensors", clip_state(proj=1024))
    with pytest.raises(ImgcondError) as e:
        forge_encoders.resolve("CLIP-ViT-H-14.safetensors", "L", "sd15")
    msg = str(e.value)
    assert "1024-d projection" in msg and "SD1.5 is 768-d" in msg and "ViT-L/14" in msg
    with pytest.raises(ImgcondError, match="CLIP-G half of SDXL is 1280-d"):
        forge_encoders.resolve("CLIP-ViT-H-14", "G", "sdxl")


def test_missing_and_odd_files(fake_forge):
    with pytest.raises(ImgcondError, match=r"'nope\.safetensors' \(encoder\) is not in .*imgcond/clip_vision"):
        forge_encoders.resolve("nope.safetensors", "L", "sd15")
    with pytest.raises(ImgcondError, match=r"needs a CLIP ViT-L/14 vision encoder .* none is in .*clip_vision"):
        forge_encoders.resolve(AUTO, "L", "sd15")
    with pytest.raises(ArgumentError, match="no folders"):
        forge_encoders.resolve("../x.safetensors", "L", "sd15")
    siglip = {k.replace("class_embedding", "x"): v for k, v in clip_state().items()}
    siglip = {k: v for k, v in siglip.items() if "pre_layrnorm" not in k and "visual_projection" not in k}
    siglip[f"{P}embeddings.patch_embedding.bias"] = torch.zeros(32)
    siglip[f"{P}embeddings.position_embedding.weight"] = torch.zeros(9, 32)
    del siglip[f"{P}embeddings.x"]
    write(fake_forge, "siglip.safetensors", siglip)
    with pytest.raises(ImgcondError, match="not a CLIP vision encoder with projection"):
        forge_encoders.resolve("siglip.safetensors", "L", "sd15")
    write(fake_forge, "unet.safetensors", {"model.diffusion_model.x": torch.zeros(2)})
    with pytest.raises(ImgcondError, match="Stable Diffusion checkpoint"):
        forge_encoders.resolve("unet.safetensors", "L", "sd15")
    (fake_forge / "broken.safetensors").write_bytes(b"not a file")
    with pytest.raises(ImgcondError, match=r"cannot read broken\.safetensors"):
        forge_encoders.resolve("broken.safetensors", "L", "sd15")
    write(fake_forge, "z_l.safetensors", clip_state())
    path, _ = forge_encoders.resolve(AUTO, "L", "sd15")  # the odd files are skipped by the automatic choice
    assert os.path.basename(path) == "z_l.safetensors"


def test_model_cache_and_reload(fake_forge):
    path = write(fake_forge, "l.safetensors", clip_state())
    a = forge_encoders.load_encoder(path)
    assert forge_encoders.load_encoder(path) is a
    assert next(a.module.parameters()).dtype == torch.float32  # no CUDA text-encoder device here: fp32 on the CPU
    os.utime(path, ns=(1, 1))
    assert forge_encoders.load_encoder(path) is not a


# --- planning ---------------------------------------------------------------------------------------------------------
def test_plan_errors_before_sampling(fake_forge):
    with pytest.raises(ImgcondError, match=r"CLIP image guidance needs a SD1\.5 or SDXL model.*Flux"):
        host.plan(fake_p("flux"), values(image=image()), [])
    with pytest.raises(ImgcondError, match="no guidance image was given"):
        host.plan(fake_p(), values(), [])
    with pytest.raises(ImgcondError, match="none is in"):
        host.plan(fake_p(), values(image=image()), [])
    write(fake_forge, "l.safetensors", clip_state())
    with pytest.raises(ArgumentError, match=r"flexdiffuse\.end"):
        host.plan(fake_p(), values(image=image(), start=0.5, end=0.4), [])
    with pytest.raises(ImgcondError, match="direct image guidance needs at least 77 image tokens"):
        host.plan(fake_p(), values(image=image(), direct=True), [])
    with pytest.raises(ArgumentError, match="non-negative weights"):
        host.plan(fake_p(), values(image=image(), weight=-1.0, direct=True), [])


def test_plan_encodes_every_image_once(fake_forge):
    write(fake_forge, "l.safetensors", clip_state())
    p = fake_p()
    job = host.plan(p, values(image=image(1), image2=image(2), weight2=0.5), [(image(3), 0.25)])
    (half,) = job.halves
    assert [w for _, w in half.tokens] == [1.0, 0.5, 0.25] and job.extra_images == 1
    assert all(t.shape == (10, 768) and t.dtype == torch.float32 for t, _ in half.tokens)
    assert not torch.equal(half.tokens[0][0], half.tokens[1][0])
    assert p.sd_model.prompts == [] and half.concept is None  # no concept prompt: the text encoder is not used
    assert host.infotext(job, SPEC)["flexdiffuse_images"] == 1


def test_compatible_mode_normalises_differently(fake_forge):
    write(fake_forge, "l.safetensors", clip_state())
    a = host.plan(fake_p(), values(image=image()), []).halves[0].tokens[0][0]
    b = host.plan(fake_p(), values(image=image(), compatible=True), []).halves[0].tokens[0][0]
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_concept_uses_the_models_text_encoder(fake_forge):
    write(fake_forge, "l.safetensors", clip_state())
    p = fake_p()
    job = host.plan(p, values(image=image(), concept="  red hat "), [])
    assert p.sd_model.prompts == [["red hat"]]
    assert job.halves[0].concept.shape == (1, 77, 768)


# --- the conditioning modifier ----------------------------------------------------------------------------------------
def installed(job, family="sd15"):
    unet = FakeEngine(family).forge_objects.unet.clone()
    host.install(unet, job)
    return unet


def test_modifier_replaces_positive_cond_only_with_new_objects(fake_forge):
    write(fake_forge, "l.safetensors", clip_state())
    job = host.plan(fake_p(), values(image=image(), threshold_floor=0.0, max_guidance=1.0), [])
    unet = installed(job)
    text = torch.randn(2, 154, 768)
    keep = text.clone()
    entry, un = cond_entry(text), cond_entry(torch.randn(2, 77, 768))
    out = run_modifier(unet, [entry], [un])
    new = out[4][0]
    assert out[3][0] is un and entry["model_conds"]["c_crossattn"].cond is text and torch.equal(text, keep)
    assert new is not entry and isinstance(new["model_conds"]["c_crossattn"], FakeCondition)
    guided = new["model_conds"]["c_crossattn"].cond
    assert guided.shape == text.shape and guided is not text and not torch.equal(guided, text)
    assert torch.equal(new["cross_attn"], guided)
    expected = fd.guide_chunks(text, job.halves[0].tokens, job.params)
    assert torch.equal(guided, expected)


def test_multipliers_zero_is_identity(fake_forge):
    write(fake_forge, "l.safetensors", clip_state())
    zero = {"threshold_mult": 0, "linear_start": 0, "linear_end": 0, "clustered": 0}
    job = host.plan(fake_p(), values(image=image(), **zero), [])
    text = torch.randn(1, 77, 768, dtype=torch.float16)
    out = run_modifier(installed(job), [cond_entry(text)])
    assert torch.equal(out[4][0]["model_conds"]["c_crossattn"].cond, text)


def test_cache_per_distinct_input_shared_by_passes(fake_forge):
    write(fake_forge, "l.safetensors", clip_state())
    job = host.plan(fake_p(), values(image=image()), [])
    first, hires_a, hires_b = installed(job), installed(job), installed(job)  # the three hook calls with hires
    a, b = torch.randn(1, 77, 768), torch.randn(1, 77, 768)
    r1 = run_modifier(first, [cond_entry(a)])[4][0]["model_conds"]["c_crossattn"].cond
    r2 = run_modifier(first, [cond_entry(a.clone())])[4][0]["model_conds"]["c_crossattn"].cond
    run_modifier(hires_b, [cond_entry(a.clone())])
    assert job.computed == 1 and torch.equal(r1, r2) and r1 is not r2
    run_modifier(hires_a, [cond_entry(b), cond_entry(a)])  # AND prompts: several cond dicts
    assert job.computed == 2


def test_step_window_by_sigma(fake_forge):
    write(fake_forge, "l.safetensors", clip_state())
    job = host.plan(fake_p(), values(image=image(), start=0.2, end=0.6), [])  # sigma 8 .. 4 with the fake predictor
    unet = installed(job)
    text = torch.randn(1, 77, 768)
    for sigma, applied in ((9.0, False), (8.0, True), (5.0, True), (4.0, True), (3.9, False)):
        entry = cond_entry(text)
        got = run_modifier(unet, [entry], sigma=sigma)[4][0]
        assert (got is not entry) == applied, sigma


def test_empty_window_never_guides(fake_forge):
    write(fake_forge, "l.safetensors", clip_state())
    for start in (0.0, 0.5, 1.0):
        job = host.plan(fake_p(), values(image=image(), start=start, end=start), [])
        unet = installed(job)
        for sigma in (999999999.9, 14.6, 8.0, 5.0, 0.0):
            entry = cond_entry(torch.randn(1, 77, 768))
            assert run_modifier(unet, [entry], sigma=sigma)[4][0] is entry, (start, sigma)
        assert job.computed == 0


def test_direct_guidance_replaces_the_prompt(fake_forge):
    write(fake_forge, "l.safetensors", clip_state(grid=9))  # 82 tokens
    p = fake_p()
    job = host.plan(p, values(image=image(1), weight=0.5, image2=image(2), weight2=1.5, direct=True), [])
    assert p.sd_model.prompts == [["{}"]]
    half = job.halves[0]
    text = torch.randn(2, 154, 768)
    got = run_modifier(installed(job), [cond_entry(text)])[4][0]["model_conds"]["c_crossattn"].cond
    d = 0.25 * fd.direct_guidance(half.tokens[0][0], half.header) + 0.75 * fd.direct_guidance(
        half.tokens[1][0], half.header
    )
    assert got.shape == text.shape
    assert torch.allclose(got[0, :77], d, atol=1e-6) and torch.equal(got[0, 77:], got[0, :77])
    assert torch.equal(got[1], got[0])


def test_sdxl_two_halves_and_concept(fake_forge):
    write(fake_forge, "vit_l.safetensors", clip_state(proj=768, seed=1))
    write(fake_forge, "vit_bigg.safetensors", clip_state(proj=1280, seed=2))
    p = fake_p("sdxl")
    job = host.plan(p, values(image=image(), concept="a cat", concept_threshold=0.0), [])
    assert [h.dim for h in job.halves] == [768, 1280]
    assert job.encoder_names == {"encoder": "vit_l.safetensors", "encoder_g": "vit_bigg.safetensors"}
    assert [tuple(h.concept.shape) for h in job.halves] == [(1, 77, 768), (1, 77, 1280)]
    info = host.infotext(job, SPEC)
    assert info["flexdiffuse_encoder_g"] == "vit_bigg.safetensors"
    text = torch.randn(1, 77, 2048)
    got = run_modifier(installed(job, "sdxl"), [cond_entry(text)])[4][0]["model_conds"]["c_crossattn"].cond
    l_part, g_part = fd.split_sdxl(text)
    want_l = fd.guide_chunks(l_part, job.halves[0].tokens, job.params, job.halves[0].concept)
    want_g = fd.guide_chunks(g_part, job.halves[1].tokens, job.params, job.halves[1].concept)
    assert torch.equal(got, fd.join_sdxl(want_l, want_g))
    with pytest.raises(ImgcondError, match="1280-d"):
        host.plan(fake_p("sdxl"), values(image=image(), encoder="vit_bigg.safetensors"), [])


def test_hires_off_and_script_free_flow(fake_forge):
    """What the script does per hook, with the job kept in forge.job_state."""
    write(fake_forge, "l.safetensors", clip_state())
    p = fake_p()
    job = forge.job_state(p, "flexdiffuse", lambda: host.plan(p, values(image=image(), hires=False), []))
    original = p.sd_model.forge_objects.unet
    forge.patch_unet(p, lambda unet: host.install(unet, job))
    assert "conditioning_modifiers" not in original.model_options
    assert len(p.sd_model.forge_objects.unet.model_options["conditioning_modifiers"]) == 1
    assert job.values["hires"] is False
