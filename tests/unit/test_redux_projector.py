"""Redux control: the projector (shapes, loading a style model file, encoding tokens) (CPU, small tensors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.redux.projector import ReduxProjector, encode_tokens, load_redux
from lib_imgcond.vision.config import VisionConfig
from lib_imgcond.vision.transformer import VisionTransformer, preprocess
from tests.redux_tensors import rand

# ----------------------------------------------------------------------------------------------- projector


def test_v7_mlp_shapes_full_size_on_meta():
    with torch.device("meta"):
        proj = ReduxProjector()
        x = torch.empty(1, 729, 1152)
        assert proj.redux_up(x).shape == (1, 729, 12288)
        assert proj(x).shape == (1, 729, 4096)
    assert sum(p.numel() for p in proj.parameters()) == 64_503_808
    assert (proj.in_features, proj.out_features) == (1152, 4096)


def redux_sd(i: int = 8, m: int = 16, o: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "redux_up.weight": rand(m, i, seed=seed),
        "redux_up.bias": rand(m, seed=seed + 1),
        "redux_down.weight": rand(o, m, seed=seed + 2),
        "redux_down.bias": rand(o, seed=seed + 3),
    }


def test_load_redux_round_trip(tmp_path):
    sd = redux_sd()
    path = tmp_path / "flux1-redux-tiny.safetensors"
    save_file(sd, str(path))
    proj = load_redux(load_file(str(path)), source=path.name)
    assert (proj.in_features, proj.redux_up.out_features, proj.out_features) == (8, 16, 12)
    assert not any(p.requires_grad for p in proj.parameters())
    x = rand(2, 5, 8, seed=9)
    expected = (
        F.silu(x @ sd["redux_up.weight"].T + sd["redux_up.bias"]) @ sd["redux_down.weight"].T + sd["redux_down.bias"]
    )
    torch.testing.assert_close(proj(x), expected)
    assert load_redux(sd, dtype=torch.bfloat16).redux_up.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("sd", "message"),
    [
        ({"style_embedding": torch.zeros(1, 8, 768), "conv_in.weight": torch.zeros(4)}, "T2I-Adapter style model"),
        ({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2)}, "vision encoder"),
        ({"redux_down.weight": torch.zeros(12, 16), "redux_down.bias": torch.zeros(12)}, "missing"),
        ({**redux_sd(), "extra": torch.zeros(1)}, "unexpected"),
        ({**redux_sd(), "redux_down.weight": torch.zeros(12, 15)}, "inconsistent"),
    ],
)
def test_load_redux_wrong_files(sd, message):
    with pytest.raises(ImgcondError, match=message) as info:
        load_redux(sd, source="wrong.safetensors")
    assert "wrong.safetensors" in str(info.value)
    assert "flux1-redux-dev.safetensors" in str(info.value)


def tiny_siglip(hidden: int = 32) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = VisionConfig("siglip", hidden, 2, 1, 64, 42, 14, None, "gelu_tanh", "tiny-siglip")
    return VisionTransformer(cfg).eval()


def test_encode_tokens_shapes_and_values():
    vision, proj = tiny_siglip(), ReduxProjector(32, 16, 8)
    images = torch.rand(2, 3, 42, 42, generator=torch.Generator().manual_seed(4))
    out = encode_tokens(vision, proj, images)
    assert out.shape == (2, 9, 8)
    with torch.no_grad():
        expected = proj(vision(preprocess(images, vision.config)).last_hidden_state)
    torch.testing.assert_close(out, expected)
    assert encode_tokens(vision, proj, images[0]).shape == (1, 9, 8)


def test_encode_tokens_errors():
    vision = tiny_siglip()
    with pytest.raises(ImgcondError, match="expects 24-dim"):
        encode_tokens(vision, ReduxProjector(24, 16, 8), torch.rand(1, 3, 42, 42))
    with pytest.raises(ArgumentError, match="prepared_image"):
        encode_tokens(vision, ReduxProjector(32, 16, 8), torch.rand(1, 3, 40, 40))
    cfg = VisionConfig("clip", 32, 1, 1, 64, 42, 14, 16, "gelu", "tiny-clip")
    with pytest.raises(ImgcondError, match="needs a SigLIP"):
        encode_tokens(VisionTransformer(cfg), ReduxProjector(32, 16, 8), torch.rand(1, 3, 42, 42))
