"""Vision transformer: layout detection, strict loading, forward pass and preprocessing (SigLIP and CLIP)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.vision.config import CLIP_MEAN, CLIP_STD, detect_config, expect_kind, read_shapes
from lib_imgcond.vision.transformer import VisionTransformer, load_vision_model, preprocess
from tests.vision_states import P, clip_shapes, layer_shapes


def siglip_shapes(hidden=32, layers=2, mlp=64, patch=14, grid=3, head=True) -> dict[str, tuple[int, ...]]:
    out = {
        f"{P}embeddings.patch_embedding.weight": (hidden, 3, patch, patch),
        f"{P}embeddings.patch_embedding.bias": (hidden,),
        f"{P}embeddings.position_embedding.weight": (grid * grid, hidden),
        **layer_shapes(hidden, layers, mlp),
    }
    if head:  # the attention-pooling head of the HF files; must be ignored
        out[f"{P}head.probe"] = (1, 1, hidden)
        out[f"{P}head.attention.in_proj_weight"] = (3 * hidden, hidden)
        out[f"{P}head.mlp.fc1.weight"] = (mlp, hidden)
    return out


def randomize(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in shapes.items():
        t = torch.randn(*s, generator=g) * 0.2
        if (
            k.endswith("norm1.weight")
            or k.endswith("norm2.weight")
            or "layernorm.weight" in k
            or "layrnorm.weight" in k
        ):
            t = t + 1.0
        sd[k] = t
    return sd


SO400M = siglip_shapes(1152, 27, 4304, 14, 27)
SO400M_512 = siglip_shapes(1152, 27, 4304, 16, 32)
CLIP_L = clip_shapes(1024, 24, 4096, 14, 16, 768)
CLIP_H = clip_shapes(1280, 32, 5120, 14, 16, 1024)
CLIP_G = clip_shapes(1664, 48, 8192, 14, 16, 1280)


def vit_params(hidden: int, layers: int, mlp: int, patch: int, positions: int, clip_proj: int | None) -> int:
    per_layer = 4 * (hidden * hidden + hidden) + 4 * hidden + (hidden * mlp + mlp) + (mlp * hidden + hidden)
    n = 3 * patch * patch * hidden + positions * hidden + layers * per_layer + 2 * hidden
    if clip_proj is None:
        return n + hidden  # patch-conv bias
    return n + hidden + 2 * hidden + clip_proj * hidden  # class token, pre-LN, projection


# ----------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        (SO400M, ("siglip", 1152, 27, 16, 4304, 384, 14, None, "gelu_tanh", "siglip-so400m-384", 729)),
        (SO400M_512, ("siglip", 1152, 27, 16, 4304, 512, 16, None, "gelu_tanh", "siglip-so400m-512", 1024)),
        (CLIP_L, ("clip", 1024, 24, 16, 4096, 224, 14, 768, "quick_gelu", "clip-vit-l-14", 257)),
        (CLIP_H, ("clip", 1280, 32, 16, 5120, 224, 14, 1024, "gelu", "clip-vit-h-14", 257)),
        (CLIP_G, ("clip", 1664, 48, 16, 8192, 224, 14, 1280, "gelu", "clip-vit-bigg-14", 257)),
    ],
)
def test_detect_config_full_size(shapes, expected):
    cfg = detect_config(shapes)
    got = (cfg.kind, cfg.hidden, cfg.layers, cfg.heads, cfg.mlp, cfg.image_size, cfg.patch, cfg.proj_dim, cfg.act)
    assert (*got, cfg.name, cfg.num_positions) == expected


def test_detect_config_tiny_and_tensor_values():
    cfg = detect_config(randomize(siglip_shapes(hidden=128, layers=3)))
    assert (cfg.kind, cfg.hidden, cfg.layers, cfg.heads, cfg.image_size, cfg.grid) == ("siglip", 128, 3, 2, 42, 3)


@pytest.mark.parametrize(
    ("shapes", "proj", "tokens"),
    [(SO400M, None, 729), (CLIP_L, 768, 257), (CLIP_G, 1280, 257)],
)
def test_full_size_models_on_meta(shapes, proj, tokens):
    cfg = detect_config(shapes)
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == vit_params(cfg.hidden, cfg.layers, cfg.mlp, cfg.patch, cfg.num_positions, proj)
    expected = {k: v for k, v in shapes.items() if ".head." not in k}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    with torch.device("meta"):
        out = model(torch.empty(2, 3, cfg.image_size, cfg.image_size))
    assert out.last_hidden_state.shape == (2, tokens, cfg.hidden)
    assert out.penultimate_hidden_states.shape == (2, tokens, cfg.hidden)
    if proj is None:
        assert out.image_embeds is None
        assert out.projected_tokens is None
    else:
        assert out.image_embeds.shape == (2, proj)
        assert out.projected_tokens.shape == (2, tokens, proj)


def test_so400m_parameter_count_matches_the_published_size():
    # The published SiglipVisionModel so400m-patch14-384 has 428,225,600 parameters including its attention-pooling
    # head (probe, MultiheadAttention, LayerNorm, MLP), which Redux does not use and we do not build.
    h, m = 1152, 4304
    head = h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * m + m) + (m * h + h)
    with torch.device("meta"):
        model = VisionTransformer(detect_config(SO400M))
    assert sum(p.numel() for p in model.parameters()) + head == 428_225_600
    # CLIPVisionModelWithProjection ViT-L/14: 303,179,776 + the 1024×768 projection; OpenCLIP ViT-H/14 visual: 632.08 M.
    for shapes, published in ((CLIP_L, 303_966_208), (CLIP_H, 632_076_800)):
        with torch.device("meta"):
            model = VisionTransformer(detect_config(shapes))
        assert sum(p.numel() for p in model.parameters()) == published


def test_openclip_format_is_refused_with_the_expected_file():
    shapes = {
        "visual.conv1.weight": (1280, 3, 14, 14),
        "visual.transformer.resblocks.0.ln_1.weight": (1280,),
        "visual.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
    }
    with pytest.raises(ImgcondError, match=r"OpenCLIP.*CLIP-ViT-H-14\.safetensors"):
        detect_config(shapes, "open_clip_pytorch_model.safetensors")


@pytest.mark.parametrize(
    ("shapes", "found"),
    [
        ({"redux_up.weight": (12288, 1152), "redux_down.weight": (4096, 12288)}, "Flux Redux"),
        (
            {
                "text_model.embeddings.token_embedding.weight": (49408, 768),
                "text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
            },
            "CLIP text encoder",
        ),
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "Stable Diffusion"),
        ({"encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096), "shared.weight": (32128, 4096)}, "T5"),
        ({"foo.bar": (3,)}, "unrecognised"),
    ],
)
def test_wrong_files_name_what_was_found(shapes, found):
    with pytest.raises(ImgcondError, match=found) as info:
        detect_config(shapes, "wrong.safetensors")
    assert "wrong.safetensors" in str(info.value)
    assert "vision encoder" in str(info.value)


def test_expect_kind_message():
    cfg = detect_config(CLIP_L, source="sd_xl_base.safetensors")
    with pytest.raises(ImgcondError) as info:
        expect_kind(cfg, {"siglip"}, "siglip slot")
    assert str(info.value) == (
        "siglip slot: sd_xl_base.safetensors looks like clip-vit-l-14, expected a SigLIP so400m vision encoder "
        "(sigclip_vision_patch14_384.safetensors)"
    )
    expect_kind(cfg, {"clip"}, "clip slot")
    expect_kind(cfg, {"clip-vit-l-14"}, "clip slot")
    with pytest.raises(ImgcondError, match=r"clip slot: .*CLIP-ViT-H-14"):
        expect_kind(cfg, {"clip-vit-h-14"}, "clip slot")
    expect_kind(detect_config(SO400M), {"siglip"}, "siglip slot")


# ----------------------------------------------------------------------------------------------- loading + forward


def reference_forward(sd: dict[str, torch.Tensor], cfg, pixels: torch.Tensor):
    """Plain re-statement of the ViT maths with explicit per-head softmax attention."""

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.layer_norm_eps) * sd[name + ".weight"] + sd[name + ".bias"]

    def lin(x, name, bias=True):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if bias else y

    x = F.conv2d(
        pixels, sd[P + "embeddings.patch_embedding.weight"], sd.get(P + "embeddings.patch_embedding.bias"), cfg.patch
    )
    x = x.flatten(2).transpose(1, 2)
    if cfg.kind == "clip":
        cls = sd[P + "embeddings.class_embedding"].expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1)
    x = x + sd[P + "embeddings.position_embedding.weight"]
    if cfg.kind == "clip":
        x = ln(x, P + "pre_layrnorm")
    hs = [x]
    dh = cfg.hidden // cfg.heads
    for i in range(cfg.layers):
        pre = f"{P}encoder.layers.{i}."
        h = ln(x, pre + "layer_norm1")
        q, k, v = (lin(h, pre + f"self_attn.{n}_proj") for n in "qkv")
        heads = []
        for j in range(cfg.heads):
            sl = slice(j * dh, (j + 1) * dh)
            w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / dh**0.5, -1)
            heads.append(w @ v[..., sl])
        x = x + lin(torch.cat(heads, -1), pre + "self_attn.out_proj")
        h = lin(ln(x, pre + "layer_norm2"), pre + "mlp.fc1")
        if cfg.act == "gelu_tanh":
            h = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3)))
        else:
            h = 0.5 * h * (1 + torch.erf(h / 2**0.5))
        x = x + lin(h, pre + "mlp.fc2")
        hs.append(x)
    return x, hs[-2], ln(x, P + "post_layernorm")


def test_siglip_round_trip_and_forward(tmp_path):
    sd = randomize(siglip_shapes(hidden=128, layers=2, mlp=96))
    path = tmp_path / "sigclip_tiny.safetensors"
    save_file(sd, str(path))
    assert read_shapes(str(path)) == {k: tuple(v.shape) for k, v in sd.items()}
    loaded = load_file(str(path))
    model = load_vision_model(loaded, source=path.name)
    cfg = model.config
    assert (cfg.kind, cfg.heads, cfg.source) == ("siglip", 2, path.name)
    assert not any(p.requires_grad for p in model.parameters())
    state = model.state_dict()
    assert set(state) == {k for k in sd if ".head." not in k}
    for k, v in state.items():
        assert torch.equal(v, sd[k])

    images = torch.rand(2, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    pixels = preprocess(images, cfg)
    out = model(pixels)
    _last, penult, post = reference_forward(sd, cfg, pixels)
    assert out.last_hidden_state.shape == (2, 9, 128)
    torch.testing.assert_close(out.last_hidden_state, post, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.penultimate_hidden_states, penult, atol=1e-4, rtol=1e-4)
    assert out.image_embeds is None
    torch.testing.assert_close(model.encode(images).last_hidden_state, out.last_hidden_state)


def test_clip_round_trip_and_forward(tmp_path):
    sd = randomize(clip_shapes(hidden=64, layers=3, mlp=80, proj=24), seed=3)
    sd[P + "embeddings.position_ids"] = torch.arange(10).unsqueeze(0)  # older HF files carry this buffer
    path = tmp_path / "clip_tiny.safetensors"
    save_file(sd, str(path))
    model = load_vision_model(load_file(str(path)), dtype=torch.float64)
    cfg = model.config
    assert (cfg.kind, cfg.proj_dim, cfg.act, cfg.heads) == ("clip", 24, "gelu", 1)
    assert model.visual_projection.weight.dtype == torch.float64

    pixels = torch.randn(1, 3, 42, 42, dtype=torch.float64)
    out = model(pixels)
    sd64 = {k: v.double() for k, v in sd.items()}
    last, penult, post = reference_forward(sd64, cfg, pixels)
    torch.testing.assert_close(out.last_hidden_state, last)
    torch.testing.assert_close(out.penultimate_hidden_states, penult)
    torch.testing.assert_close(out.projected_tokens, post @ sd64["visual_projection.weight"].T)
    torch.testing.assert_close(out.image_embeds, out.projected_tokens[:, 0])
    assert out.last_hidden_state.shape == (1, 10, 64)


def test_quick_gelu_for_clip_l():
    cfg = dataclasses.replace(detect_config(clip_shapes()), act="quick_gelu")
    model = VisionTransformer(cfg)
    x = torch.randn(5)
    torch.testing.assert_close(model.vision_model.encoder.layers[0].mlp.act(x), x * torch.sigmoid(1.702 * x))


def test_strict_loading_errors():
    sd = randomize(siglip_shapes())
    missing = dict(sd)
    del missing[P + "encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(ImgcondError, match=r"missing vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_vision_model(missing, source="x.safetensors")
    extra = {**sd, "vision_model.encoder.layers.1.extra.weight": torch.zeros(2)}
    with pytest.raises(ImgcondError, match=r"unexpected vision_model\.encoder\.layers\.1\.extra\.weight"):
        load_vision_model(extra)
    wrong = {**sd, P + "encoder.layers.0.mlp.fc2.weight": torch.zeros(32, 65)}
    with pytest.raises(ImgcondError, match="wrong shape"):
        load_vision_model(wrong)
    # text half of a full SigLIP/CLIP model is ignored
    load_vision_model(
        {**sd, "text_model.embeddings.token_embedding.weight": torch.zeros(4, 8), "logit_scale": torch.zeros(1)}
    )


def test_wrong_input_size_is_a_clear_error():
    model = VisionTransformer(detect_config(siglip_shapes()))
    with pytest.raises(ImgcondError, match="expects 9 tokens"):
        model(torch.zeros(1, 3, 56, 56))


# ----------------------------------------------------------------------------------------------- preprocessing


def test_preprocess_siglip_quantises_and_normalises():
    cfg = detect_config(siglip_shapes())
    images = torch.rand(2, 3, 42, 42, generator=torch.Generator().manual_seed(2))
    out = preprocess(images, cfg)
    assert out.shape == (2, 3, 42, 42)
    assert out.dtype == torch.float32
    back = (out * 0.5 + 0.5) * 255
    torch.testing.assert_close(back, torch.round(images * 255), atol=1e-4, rtol=0)
    assert preprocess(torch.rand(1, 3, 30, 70), cfg).shape == (1, 3, 42, 42)  # squashed when not square
    assert preprocess(torch.full((1, 3, 42, 42), 2.0), cfg).max() == 1.0  # clamped


def test_preprocess_clip_short_side_and_centre_crop():
    cfg = detect_config(clip_shapes())
    cols = torch.arange(126, dtype=torch.float32) / 200
    images = cols.expand(1, 3, 42, 126).clone()  # 126×42: already the right height, crop columns 42..83
    out = preprocess(images, cfg)
    assert out.shape == (1, 3, 42, 42)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected = (torch.round(images[..., 42:84] * 255) / 255 - mean) / std
    torch.testing.assert_close(out, expected)
    assert preprocess(torch.rand(1, 3, 21, 63), cfg).shape == (1, 3, 42, 42)  # upscaled, then cropped


def test_bare_siglip_keys_without_prefix_are_accepted():
    # transformers ≥ 5 saves a bare SiglipVisionModel as embeddings.* / encoder.* / post_layernorm.* / head.*
    sd = randomize(siglip_shapes())
    bare = {k.removeprefix(P): v for k, v in sd.items()}
    assert detect_config(bare).name == "siglip-h32-l2-42"
    model = load_vision_model(bare)
    assert torch.equal(model.vision_model.post_layernorm.weight, sd[P + "post_layernorm.weight"])
