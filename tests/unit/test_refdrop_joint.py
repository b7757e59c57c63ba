"""RefDrop on joint (text + image) attention: the blend's identities on random tensors, and the DiT layer tables."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.refdrop import families, joint
from lib_imgcond.refdrop import layers as rd

B, H, D, TXT, IMG = 2, 3, 4, 5, 7


def attn(q, k, v):
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def tensors(seed, img=IMG, batch=B):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, H, TXT + img, D, generator=g, dtype=torch.float64) for _ in range(3)]


def ref(seed, img=IMG):
    _, k, v = tensors(seed, img, batch=1)
    return joint.pack(k[:, :, TXT:]), joint.pack(v[:, :, TXT:])


def test_pack_unpack_round_trip():
    t = tensors(0)[0]
    packed = joint.pack(t)
    assert packed.shape == (B, TXT + IMG, H * D) and packed.is_contiguous()
    assert torch.equal(joint.unpack(packed, H), t)


def test_c0_is_exactly_plain_and_text_rows_never_change():
    q, k, v = tensors(1)
    kr, vr = ref(2)
    plain = attn(q, k, v)
    assert torch.equal(joint.joint_blend(q, k, v, TXT, [(kr, vr, 0.0)], attn), plain)
    out = joint.joint_blend(q, k, v, TXT, [(kr, vr, 0.8)], attn)
    assert torch.equal(out[:, :TXT], plain[:, :TXT])
    assert not torch.allclose(out[:, TXT:], plain[:, TXT:])


def test_c1_is_the_reference_branch_alone():
    q, k, v = tensors(3)
    kr, vr = ref(4)
    out = joint.joint_blend(q, k, v, TXT, [(kr, vr, 1.0)], attn)
    branch = attn(q, joint.with_text(k, kr, TXT), joint.with_text(v, vr, TXT))
    torch.testing.assert_close(out[:, TXT:], branch[:, TXT:], rtol=0, atol=1e-12)


def test_blend_is_linear_in_c():
    q, k, v = tensors(5)
    kr, vr = ref(6)
    outs = {c: joint.joint_blend(q, k, v, TXT, [(kr, vr, c)], attn) for c in (-0.3, 0.0, 0.5, 1.0)}
    slope = outs[1.0] - outs[0.0]
    for c in (-0.3, 0.5):
        torch.testing.assert_close(outs[c], outs[0.0] + c * slope, rtol=0, atol=1e-12)


def test_a_reference_equal_to_the_current_image_kv_gives_plain_for_any_c():
    """Concat-attention identity: [k_txt; k_img] is k itself, so the branch is the plain attention."""
    q, k, v = tensors(7)
    kr, vr = joint.pack(k[:1, :, TXT:]), joint.pack(v[:1, :, TXT:])
    q, k, v = q[:1], k[:1], v[:1]
    assert torch.equal(joint.with_text(k, kr, TXT), k)
    plain = attn(q, k, v)
    for c in (-1.0, 0.3, 0.7, 1.0):
        assert torch.equal(joint.joint_blend(q, k, v, TXT, [(kr, vr, c)], attn), plain)


def test_a_reference_of_another_size_is_attended_as_it_is():
    q, k, v = tensors(8)
    kr, vr = ref(9, img=IMG + 6)
    out = joint.joint_blend(q, k, v, TXT, [(kr, vr, 0.5)], attn)
    assert out.shape == (B, TXT + IMG, H * D) and torch.isfinite(out).all()


def test_several_references_add_up():
    q, k, v = tensors(10)
    (k1, v1), (k2, v2) = ref(11), ref(12)
    both = joint.joint_blend(q, k, v, TXT, [(k1, v1, 0.3), (k2, v2, -0.2)], attn)
    plain = attn(q, k, v)
    one = joint.joint_blend(q, k, v, TXT, [(k1, v1, 0.3)], attn) - plain
    two = joint.joint_blend(q, k, v, TXT, [(k2, v2, -0.2)], attn) - plain
    torch.testing.assert_close(both, plain + one + two, rtol=0, atol=1e-12)


# --- DiT layer tables -------------------------------------------------------------------------------------------------
FLUX = families.dit_family("flux", (19, 38), 3072)


def test_dit_family_tag_and_table():
    assert FLUX == "flux:19+38@3072"
    assert families.dit_shape(FLUX) == ("flux", (19, 38), 3072) and families.dit_shape("sdxl") is None
    table = rd.layer_table(FLUX)
    assert len(table) == 57 and table[0][:3] == ("double", 0, 0) and table[19][:3] == ("single", 0, 0)
    assert rd.groups(FLUX) == ("double", "single")
    assert rd.layer_shape(FLUX, ("single", 3, 0), 1024, 768) == (64 * 48, 3072)
    assert rd.layer_shape(FLUX, ("double", 0, 0), 1000, 1000) == (63 * 63, 3072)  # padded to whole patches


@pytest.mark.parametrize(
    ("base", "count", "channels", "label"), [("krea2", 28, 6144, "Krea 2"), ("ernie_image", 36, 4096, "ERNIE-Image")]
)
def test_single_group_dit_families(base, count, channels, label):
    tag = families.dit_family(base, (count,), channels)
    assert tag == f"{base}:{count}@{channels}" and families.dit_shape(tag) == (base, (count,), channels)
    assert families.dit_label(tag) == f"{label} ({count} blocks, {channels} channels)"
    group = families.DIT[base].groups[0]
    assert rd.layer_shape(tag, (group, count - 1, 0), 1024, 768) == (64 * 48, channels)  # 16 pixels per token side


@pytest.mark.parametrize(
    ("spec", "count"),
    [("all", 57), ("double", 19), ("single:0-9", 10), ("double:0-18, single:0-37", 57), ("double:3, single:1,5", 3)],
)
def test_dit_layers_parse_and_format_round_trip(spec, count):
    chosen = rd.parse_layers(spec, FLUX)
    assert len(chosen) == count
    assert rd.parse_layers(rd.format_layers(chosen, FLUX), FLUX) == chosen


@pytest.mark.parametrize("spec", ["double:19", "single:38", "output:0", "middle"])
def test_dit_layer_errors_name_the_valid_ranges(spec):
    with pytest.raises(ArgumentError, match=r"double|single"):
        rd.parse_layers(spec, FLUX)


def test_unknown_dit_families_are_refused():
    with pytest.raises(ImgcondError, match="qwen"):
        families.dit_family("qwen", (1, 1), 64)
    with pytest.raises(ImgcondError, match="not 'sd3:1\\+1@64'"):
        rd.check_family("sd3:1+1@64")
    with pytest.raises(ImgcondError, match="layer groups double, single"):
        families.dit_family("flux", (1,), 64)
    with pytest.raises(ImgcondError, match="not 'flux:3@64'"):
        rd.check_family("flux:3@64")


def test_pid_and_flux2_tags_tables_and_shapes():
    pid = families.dit_family("pid", (14, 2), 1536)
    assert pid == "pid:14+2@1536" and rd.groups(pid) == ("patch", "pixel")
    table = rd.layer_table(pid)
    assert len(table) == 16 and table[14][:3] == ("pixel", 0, 0)
    assert rd.layer_shape(pid, ("pixel", 1, 0), 2048, 1024) == (128 * 64, 1536)  # 16-pixel patches, no VAE
    assert rd.family_label(pid) == "PiD (14 patch + 2 pixel blocks, 1536 channels)"
    assert families.DIT["pid"].pixel_space and not families.DIT["flux2"].pixel_space
    klein = families.dit_family("flux2", (5, 20), 3072)
    assert rd.groups(klein) == ("double", "single") and rd.family_label(klein).startswith("Flux.2 (5 double")
    assert rd.layer_shape(klein, ("single", 19, 0), 1024, 1024) == (64 * 64, 3072)  # 1/16 latent, 1 × 1 patches
