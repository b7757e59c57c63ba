"""Redux control's glue (spec, model files, planning) against small fakes of Forge's documented API.

Tiny SigLIP / Redux / CLIP files are written to a temporary models folder (the patches are tested in
test_redux_patch_glue.py). Nothing here imports Gradio, Forge or scripts/.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.host import forge
from lib_imgcond.redux import forge_files as files
from lib_imgcond.redux import forge_redux as host
from lib_imgcond.redux.projector import ReduxProjector
from lib_imgcond.redux.spec import SLOT_FIELDS, SLOTS, SPEC, expand_images
from lib_imgcond.spec.params import ImageInput
from lib_imgcond.vision.config import VisionConfig
from lib_imgcond.vision.transformer import VisionTransformer
from tests.glue.fakes import fake_p


# --- fixtures ---------------------------------------------------------------------------------------------------------
def _save(module: torch.nn.Module, path) -> None:
    torch.manual_seed(0)
    for prm in module.parameters():
        torch.nn.init.normal_(prm, 0.0, 0.05)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))


@pytest.fixture
def models(tmp_path, monkeypatch):
    monkeypatch.setattr(forge, "models_dir", lambda *parts: str(tmp_path.joinpath(*parts)))
    monkeypatch.setattr(files, "extra_dirs", lambda: [])
    (tmp_path / "imgcond" / "siglip").mkdir(parents=True)
    (tmp_path / "imgcond" / "redux").mkdir(parents=True)
    with torch.device("cpu"):
        _save(
            VisionTransformer(VisionConfig("siglip", 16, 1, 1, 32, 384, 14, None, "gelu_tanh", "t")),
            tmp_path / "imgcond/siglip/siglip-tiny.safetensors",
        )
        _save(
            VisionTransformer(VisionConfig("clip", 16, 1, 1, 32, 224, 14, 8, "gelu", "c")),
            tmp_path / "imgcond/siglip/a-clip-l.safetensors",
        )
        _save(ReduxProjector(16, 32, 64), tmp_path / "imgcond/redux/redux-tiny.safetensors")
    files._MODELS.clear()
    host._ENCODINGS.clear()
    return tmp_path


def picture(w=96, h=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def mask_box(w, h, box) -> Image.Image:
    arr = np.zeros((h, w), dtype=np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = 255
    return Image.fromarray(arr, "L")


def values(**kw):
    named = {"image1": ImageInput(picture()), "siglip": "siglip-tiny.safetensors", **kw}
    return SPEC.parse([named])


# --- spec -------------------------------------------------------------------------------------------------------------
def test_spec_layout_and_axes():
    names = [p.name for p in SPEC.params]
    assert names[:4] == ["siglip", "redux_model", "start", "end"]
    assert len(names) == 4 + SLOTS * len(SLOT_FIELDS)
    axes = {p.name for p in SPEC.params if p.xyz}
    assert {f"factor{k}" for k in range(1, 5)} <= axes and {f"weight{k}" for k in range(1, 5)} <= axes
    assert {"start", "end"} <= axes
    assert SPEC.by_name["factor1"].minimum == 1 and SPEC.by_name["factor1"].maximum == 9
    assert SPEC.by_name["factor1"].step == 0.1
    assert SPEC.by_name["interpolation1"].choices == ("nearest", "bilinear", "bicubic", "area", "nearest-exact")
    assert SPEC.by_name["control1"].choices == ("highest", "high", "medium", "low", "lowest", "advanced")


def test_images_list_form_expands_to_slots():
    flat = expand_images({"start": 0.2, "images": [{"image": "x", "factor": 2.0}, {"image": "y", "mode": "autocrop"}]})
    assert flat == {"start": 0.2, "image1": "x", "factor1": 2.0, "image2": "y", "mode2": "autocrop"} | {
        "use3": False,
        "use4": False,
    }
    with pytest.raises(ArgumentError, match=r"redux.images\[0\].fact"):
        expand_images({"images": [{"fact": 2}]})
    with pytest.raises(ArgumentError, match=r"redux\.images"):
        expand_images({"images": [{}] * 5})


def test_parse_errors_name_the_argument():
    with pytest.raises(ArgumentError, match=r"redux.factor2=12"):
        SPEC.parse([{"factor2": 12}])
    with pytest.raises(ArgumentError, match=r"redux.strength_type1"):
        SPEC.parse([{"strength_type1": "add"}])


def test_infotext_skips_unused_slots_and_pastes_back():
    v = values(image3=ImageInput(picture(seed=3)), factor3=2.5, weight3=0.5, control3="advanced")
    info = SPEC.infotext(v, skip=host.infotext_skip(v))
    assert info["redux_factor3"] == 2.5 and info["redux_weight3"] == 0.5 and "redux_factor2" not in info
    assert all(not k.startswith(("redux_image", "redux_mask")) for k in info)
    text = {k: str(x) for k, x in info.items()}
    back = SPEC.paste(text)
    assert back["factor3"] == 2.5 and back["control3"] == "advanced" and back["siglip"] == "siglip-tiny.safetensors"


# --- model files ------------------------------------------------------------------------------------------------------
def test_files_listed_and_auto_pick_skips_wrong_kind(models):
    assert files.list_files("siglip") == ["a-clip-l.safetensors", "siglip-tiny.safetensors"]
    assert files.resolve("siglip", "").endswith("siglip-tiny.safetensors")  # the CLIP file sorts first but is skipped
    assert files.resolve("redux", "").endswith("redux-tiny.safetensors")


def test_missing_and_wrong_files_are_clear(models):
    with pytest.raises(ImgcondError, match=r"'nope.safetensors' was not found in .*imgcond/siglip"):
        files.resolve("siglip", "nope.safetensors")
    with pytest.raises(ImgcondError, match=r"not a .safetensors file"):
        files.resolve("redux", "model.ckpt")
    with pytest.raises(ImgcondError, match=r"a-clip-l.safetensors looks like clip-vit.* expected a SigLIP so400m"):
        host.plan(fake_p("flux"), values(siglip="a-clip-l.safetensors"))
    (models / "imgcond/redux/redux-tiny.safetensors").unlink()
    with pytest.raises(ImgcondError, match=r"no .safetensors file in .*imgcond/redux.*flux1-redux-dev"):
        host.plan(fake_p("flux"), values())


def test_extra_folders_from_settings(models, tmp_path_factory, monkeypatch):
    extra = tmp_path_factory.mktemp("extra")
    (extra / "redux").mkdir()
    (models / "imgcond/redux/redux-tiny.safetensors").rename(extra / "redux" / "other.safetensors")
    monkeypatch.setattr(files, "extra_dirs", lambda: [str(extra)])
    assert files.list_files("redux") == ["other.safetensors"]
    assert files.resolve("redux", "other.safetensors") == str(extra / "redux" / "other.safetensors")


# --- planning ---------------------------------------------------------------------------------------------------------
def test_plan_refuses_non_flux_first():
    with pytest.raises(ImgcondError, match=r"Redux needs a Flux or Chroma model, but the loaded checkpoint is SD1\.5"):
        host.plan(fake_p("sd15"), values())


def test_plan_needs_an_image(models):
    with pytest.raises(ImgcondError, match="no image slot has an image"):
        host.plan(fake_p("flux"), SPEC.parse([{"siglip": ""}]))
    with pytest.raises(ImgcondError, match="no image slot has an image"):
        host.plan(fake_p("flux"), values(use1=False))


@pytest.mark.parametrize(
    ("kw", "count"),
    [
        ({"control1": "highest"}, 729),
        ({"control1": "high"}, 169),
        ({}, 81),
        ({"control1": "lowest"}, 25),
        ({"control1": "advanced", "factor1": 2.0}, 196),
        ({"control1": "advanced", "factor1": 6.0, "interpolation1": "bicubic"}, 16),
    ],
)
def test_token_counts(models, kw, count):
    job = host.plan(fake_p("flux"), values(**kw))
    assert job.count == count and job.tokens.shape == (1, count, 64)
    assert host.describe_counts(values(**kw))[0].startswith(f"**{count} Redux tokens**")


def test_weight_strength_and_order(models):
    base = host.plan(fake_p("flux"), values())
    scaled = host.plan(fake_p("flux"), values(weight1=0.5, strength1=2.0))
    torch.testing.assert_close(scaled.tokens, base.tokens * 0.25 * 2.0)
    biased = host.plan(fake_p("flux"), values(strength_type1="attn_bias", strength1=0.3))
    torch.testing.assert_close(biased.tokens, base.tokens)  # the strength goes to the attention bias instead
    assert biased.needs_bias and not base.needs_bias
    assert not host.plan(fake_p("flux"), values(strength_type1="attn_bias", strength1=1.0)).needs_bias
    two = host.plan(fake_p("flux"), values(image2=ImageInput(picture(seed=5)), control2="lowest"))
    assert two.count == 81 + 25 and [(s.slot, s.start, s.count) for s in two.spans] == [(1, 0, 81), (2, 81, 25)]
    torch.testing.assert_close(two.tokens[:, :81], base.tokens)
    off = host.plan(fake_p("flux"), values(image2=ImageInput(picture(seed=5)), use2=False))
    assert off.count == 81


def test_each_image_is_encoded_once_per_job(models, monkeypatch):
    calls = []
    real = host.redux_projector.encode_tokens
    monkeypatch.setattr(host.redux_projector, "encode_tokens", lambda *a: calls.append(1) or real(*a))
    p = fake_p("flux")
    same = ImageInput(picture())  # slot 2 holds the same picture as slot 1, prepared the same way
    first = host.plan(p, values(image2=same, image3=ImageInput(picture(seed=5))))
    assert len(calls) == 2
    again = host.plan(p, values(image2=same, weight1=0.3))  # the same job planned again (hires, batch count): cached
    assert len(calls) == 2
    torch.testing.assert_close(again.tokens[:, 81:], first.tokens[:, 81:162])
    host.plan(p, values(image2=same, mode2="keep_aspect"))  # other preprocessing of the same picture: encoded
    assert len(calls) == 3
    host.encoders.end_job(p)
    host.plan(p, values(image2=same))  # after the job ended: encoded again
    assert len(calls) == 4
    host.plan(fake_p("flux"), values(image2=same))  # a new job (an X/Y/Z cell): encoded again
    assert len(calls) == 5


def test_mask_selects_tokens_and_errors(models):
    w, h = 96, 64
    drawn = ImageInput(picture(w, h), mask_box(w, h, (0, 0, 48, 64)))  # left half
    job = host.plan(fake_p("flux"), values(image1=drawn, control1="advanced", factor1=1.0, mode1="keep_aspect"))
    assert 0 < job.count < 729
    uploaded = ImageInput(mask_box(w, h, (0, 0, 96, 64)))  # the uploaded mask wins over the drawn one
    full = host.plan(
        fake_p("flux"), values(image1=drawn, mask1=uploaded, control1="advanced", factor1=1.0, mode1="keep_aspect")
    )
    assert full.count > job.count
    with pytest.raises(ImgcondError, match=r"Redux image 1: the mask is empty"):
        host.plan(fake_p("flux"), values(mask1=ImageInput(mask_box(w, h, (0, 0, 0, 0)))))
    with pytest.raises(ImgcondError, match=r"Redux image 1: the mask is 40×40 pixels but the image is 96×64"):
        host.plan(fake_p("flux"), values(mask1=ImageInput(mask_box(40, 40, (0, 0, 10, 10)))))
    with pytest.raises(ImgcondError, match=r"Redux image 2: autocrop needs a mask"):
        host.plan(fake_p("flux"), values(image2=ImageInput(picture()), mode2="autocrop"))


@pytest.mark.parametrize("control", ["advanced", "medium"])
def test_mask_that_selects_no_token_is_an_error_naming_the_image(models, control):
    """The issue's input: 500×300, centre crop, mask rows H/4..H/2 × columns W−W/5..W. It used to append 0 tokens for
    that image without an error (ringing left pixels > 0 that no patch covers)."""
    w, h = 500, 300
    outside = ImageInput(picture(w, h, seed=2), mask_box(w, h, (w - w // 5, h // 4, w, h // 2)))
    kw = {"image2": outside, "control2": control, "factor2": 1.0, "control1": "lowest"}
    with pytest.raises(ImgcondError, match=r"^Redux image 2: the mask selects no token"):
        host.plan(fake_p("flux"), values(**kw))
    text = host.describe_counts(values(**kw))[0]
    assert "image 1: 25" in text and "image 2: ⚠️ Redux image 2: the mask selects no token" in text
    assert text.startswith("**25 Redux tokens**")


def test_plan_refuses_an_inverted_window(models):
    with pytest.raises(ArgumentError, match=r"redux\.end"):
        host.plan(fake_p("flux"), values(start=0.6, end=0.5))
