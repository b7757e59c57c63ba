"""Redux token merging through the glue: spec layout, planning with images that merge to different counts, the
UI's token count, infotext written only when merging applies, and paste-back."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lib_imgcond.redux import forge_redux as host
from lib_imgcond.redux.spec import BASE_FIELDS, MERGE_FIELDS, SLOTS, SPEC, automerge_paster, expand_images
from lib_imgcond.spec.params import ImageInput
from tests.glue.fakes import fake_p
from tests.glue.test_redux_glue import models, picture, values  # noqa: F401  (models is a fixture)

FLAT = (120, 30, 200)


def flat_image() -> ImageInput:
    return ImageInput(Image.new("RGB", (96, 64), FLAT))


@pytest.fixture
def tokens_by_image(monkeypatch):
    """Raw Redux tokens the test controls: a flat image gives 729 identical tokens, any other image random ones."""
    calls = []

    def encode_tokens(vision, projector, image):
        calls.append(1)
        if float(image.std(dim=(-2, -1)).max()) < 1e-6:
            return torch.linspace(-1.0, 1.0, 64).expand(image.shape[0], 729, 64).clone()
        seed = int(image.sum() * 1000) % 2**31
        return torch.randn(image.shape[0], 729, 64, generator=torch.Generator().manual_seed(seed))

    monkeypatch.setattr(host.redux_projector, "encode_tokens", encode_tokens)
    return calls


def test_merge_parameters_follow_every_slot_so_positional_calls_keep_their_meaning():
    names = [p.name for p in SPEC.params]
    base_end = 4 + SLOTS * len(BASE_FIELDS)
    assert names[base_end - 1] == "strength4"
    assert names[base_end:] == [f"{n}{k}" for k in range(1, SLOTS + 1) for n in MERGE_FIELDS]
    assert SPEC.by_name["automerge1"].default is False and SPEC.by_name["merge_threshold1"].default == 0.8
    assert (SPEC.by_name["merge_threshold3"].minimum, SPEC.by_name["merge_threshold3"].maximum) == (0.0, 1.0)
    old = [True, "", "", 0.0, 1.0]
    for _k in range(1, SLOTS + 1):  # the positional layout before merging existed
        old += [True, None, None, "keep_aspect", 0.2, "low", 2.0, "bicubic", 0.7, "multiply", 1.5]
    parsed = SPEC.parse(old)
    assert parsed["strength4"] == 1.5 and parsed["control2"] == "low" and not parsed["automerge1"]
    new = SPEC.parse([*old, True, 0.9, False, 0.8, False, 0.8, True, 0.95])
    assert new["automerge1"] and new["merge_threshold1"] == 0.9 and new["automerge4"] and not new["automerge2"]
    listed = SPEC.parse([expand_images({"images": [{"image": "", "automerge": True, "merge_threshold": 0.85}]})])
    assert listed["automerge1"] and listed["merge_threshold1"] == 0.85


def test_images_that_merge_to_different_counts_in_one_job(models, tokens_by_image):  # noqa: F811
    kw = {
        "image1": flat_image(),
        "control1": "highest",
        "automerge1": True,
        "merge_threshold1": 1.0,
        "image2": ImageInput(picture(seed=5)),
        "control2": "lowest",
        "automerge2": True,
        "weight2": 0.5,
    }
    job = host.plan(fake_p("flux"), values(**kw))
    assert job.count == 1 + 25
    assert [(s.slot, s.start, s.count) for s in job.spans] == [(1, 0, 1), (2, 1, 25)]
    torch.testing.assert_close(job.tokens[0, 0], torch.linspace(-1.0, 1.0, 64))  # 729 identical tokens → one
    unmerged = host.plan(fake_p("flux"), values(**{**kw, "automerge2": False}))
    torch.testing.assert_close(job.tokens[:, 1:], unmerged.tokens[:, 1:])  # random tokens: nothing to merge
    plain = host.plan(fake_p("flux"), values(**{**kw, "automerge1": False}))
    assert plain.count == 729 + 25


def test_the_ui_count_shows_merged_tokens(models, tokens_by_image):  # noqa: F811
    v = values(image1=flat_image(), control1="highest", automerge1=True, image2=ImageInput(picture(seed=5)))
    for source in (None, host.token_source(v)):  # no token lookup, or not encoded yet: an upper bound
        text = host.describe_counts(v, raw_tokens=source)[0]
        assert text.startswith("**at most 810 Redux tokens**") and "image 1: at most 729 (merged once encoded" in text
    assert tokens_by_image == []
    exact = host.describe_counts(v, raw_tokens=host.token_source(v, compute=True))[0]  # the preview encodes
    assert exact.startswith("**82 Redux tokens**") and "image 1: 1 (merged from 729)" in exact
    assert "image 2: 81" in exact
    assert len(tokens_by_image) == 1  # only the merging image needed its tokens
    assert host.plan(fake_p("flux"), v).count == 82
    assert host.describe_counts(v, raw_tokens=host.token_source(v))[0].startswith("**82 Redux tokens**")  # cached


def test_infotext_has_merge_keys_only_where_merging_applies():
    v = values(image2=ImageInput(picture(seed=5)), automerge2=True, merge_threshold2=0.9)
    info = SPEC.infotext(v, skip=host.infotext_skip(v))
    assert info["redux_automerge2"] is True and info["redux_merge_threshold2"] == 0.9
    assert not {"redux_automerge1", "redux_merge_threshold1", "redux_automerge3"} & set(info)
    plain = values()
    assert not any("merge" in k for k in SPEC.infotext(plain, skip=host.infotext_skip(plain)))
    back = SPEC.paste({k: str(x) for k, x in info.items()})
    assert back["automerge2"] is True and back["merge_threshold2"] == 0.9


def test_pasting_an_infotext_without_merging_switches_it_off():
    assert automerge_paster(1)({"redux_enabled": "True", "redux_automerge1": "True"}) is True
    assert automerge_paster(1)({"redux_enabled": "True"}) is False
    assert automerge_paster(1)({"Steps": "20"}) is None  # no Redux in that infotext: leave the checkbox alone
