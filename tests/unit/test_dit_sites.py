"""The image-token spans of the DiT sites that need more than the latent (host/sites): Krea 2's reference latents
and its one-frame latents, ERNIE-Image's image-first order; fake models carry only the attributes the rules read
(the rules are checked against the hosts' own intermediates in tests/e2e/test_refdrop_dit_backend.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host import dit_attention
from lib_imgcond.host.sites import ernie, krea
from lib_imgcond.host.sites import registry as sites

KREA = SimpleNamespace(patch=2)


def test_krea_image_follows_the_prompt_and_precedes_the_reference_latents():
    x = torch.zeros(1, 16, 1, 9, 12)  # one frame, 9×12 latent: padded to 10×12 → 5·6 image tokens
    refs = [torch.zeros(1, 16, 1, 6, 10), torch.zeros(1, 16, 3, 5)]  # 3·5 and 2·3 tokens, 5-D and 4-D as kept
    inputs = dit_attention.call_inputs(sites.site("krea2"), KREA, x, {"ref_latents": refs, "c_crossattn": None})
    assert inputs == {"refs": 21}
    assert krea.SITE.span(KREA, x, 12 + 30 + 21, **inputs) == (12, 42)
    assert krea.SITE.span(KREA, x, 12 + 30) == (12, 42)  # no reference latents: the image ends the call
    assert dit_attention.call_inputs(krea.SITE, KREA, x, {"ref_latents": None}) == {"refs": 0}


def test_krea_refuses_a_latent_of_several_frames_before_the_model_runs():
    with pytest.raises(ImgcondError, match=r"RefDrop on Krea 2 .* 4 frames"):
        dit_attention.call_inputs(krea.SITE, KREA, torch.zeros(1, 16, 4, 8, 8), {})
    with pytest.raises(ImgcondError, match="cannot hold 16 image and 15 reference tokens"):
        krea.SITE.span(KREA, torch.zeros(1, 16, 1, 8, 8), 20, refs=15)


def test_ernie_image_comes_first():
    model = SimpleNamespace(patch_size=1)
    x = torch.zeros(2, 128, 4, 6)
    assert dit_attention.call_inputs(ernie.SITE, model, x, {}) == {}
    assert ernie.SITE.span(model, x, 24 + 12) == (0, 24)
    with pytest.raises(ImgcondError, match="ERNIE-Image attention call of 20 tokens"):
        ernie.SITE.span(model, x, 20)
