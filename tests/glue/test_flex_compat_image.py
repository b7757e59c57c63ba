"""CLIP image guidance, FlexDiffuse-compatible mode: the guidance image reaches the encoder exactly as the original
prepares it. The original's pipeline is rendered here step by step in plain PIL/numpy and compared to ours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lib_imgcond.flexdiffuse import forge_encoders
from lib_imgcond.flexdiffuse import image as flex_image
from lib_imgcond.spec.params import ImageInput
from lib_imgcond.vision import config as vision_cfg
from lib_imgcond.vision import forge_encoders as encoders
from lib_imgcond.vision import transformer as vision

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def original_pixels(img: Image.Image, size: int = 224) -> np.ndarray:
    """tim-speed/flexdiffuse (HEAD 2022-10-16): encode/clip.py preprocess() then CLIPEncoder.image(), by hand."""
    # 1. long side 512, the other floored to a multiple of 64, LANCZOS (PIL, 8-bit)
    w, h = img.size
    if h > w:
        w, h = (int(w / (h / 512)) // 64) * 64, 512
    elif w > h:
        w, h = 512, (int(h / (w / 512)) // 64) * 64
    else:
        w, h = 512, 512
    img = img.resize((w, h), resample=Image.LANCZOS).convert("RGB")
    # 2. [0, 255] -> [0, 1] -> [-1, 1]
    a = np.asarray(img).astype(np.float32) / 255.0
    a = 2.0 * a - 1.0
    # 3. torchvision center_crop to the short side: offsets int(round((side - crop) / 2))
    crop = min(h, w)
    top, left = round((h - crop) / 2.0), round((w - crop) / 2.0)
    a = a[top : top + crop, left : left + crop]
    # 4. bicubic with antialias to size x size, no clamp, no quantisation (PIL's float "F" resampling is the same
    #    separable antialiased cubic kernel, a = -0.5, that torch's antialias=True uses)
    planes = [
        np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c])).resize((size, size), Image.BICUBIC))
        for c in range(3)
    ]
    a = np.stack(planes)
    # 5. CLIP mean/std applied to the [-1, 1] data
    return (a - MEAN[:, None, None]) / STD[:, None, None]


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with texture and a sharp edge (ringing shows beyond [-1, 1] when nothing clamps)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 7.0 + yy / 11.0)], axis=-1) * 200
    base[:, w // 3 : w // 3 + 5] = 255
    noise = rng.integers(0, 56, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize(("w", "h"), [(500, 300), (300, 500), (640, 360), (333, 333), (100, 60), (1000, 1000)])
def test_compatible_pixels_match_the_original_step_by_step(w, h):
    img = photo(w, h, seed=w + h)
    ours = forge_encoders.compat_pixels(ImageInput(img), 224)[0].numpy()
    ref = original_pixels(img)
    assert ours.shape == ref.shape == (3, 224, 224) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-5


def test_the_aspect_distortion_and_the_unclamped_range_are_kept():
    img = photo(500, 300, seed=1)
    assert flex_image.compat_resize_size(500, 300) == (512, 256)  # aspect 1.667 -> 2.0
    ours = forge_encoders.compat_pixels(ImageInput(img), 224)[0]
    lo, hi = (-1.0 - MEAN) / STD, (1.0 - MEAN) / STD
    over = (ours > torch.from_numpy(hi)[:, None, None]) | (ours < torch.from_numpy(lo)[:, None, None])
    assert bool(over.any())  # bicubic overshoot at the sharp edge survives: no clamp
    # the corrected preprocessing of the same image is far from the original's (the defect this mode fixes)
    corrected = vision.preprocess(forge_encoders.image_tensor(ImageInput(img)), _cfg(224))[0]
    assert float((corrected - ours).abs().max()) > 1.0


def _cfg(size: int) -> vision_cfg.VisionConfig:
    return vision_cfg.VisionConfig("clip", 16, 1, 1, 32, size, 14, 8, "gelu", "c")


def test_compatible_mode_feeds_those_pixels_to_the_encoder():
    seen = []

    class Encoder(torch.nn.Module):
        config = _cfg(42)

        def forward(self, pixels):
            seen.append(pixels)
            return vision_cfg.VisionOutput(pixels, pixels, None, torch.zeros(1, 10, 8))

    cpu = torch.device("cpu")
    img = ImageInput(photo(500, 300, seed=2))
    forge_encoders.encode_images(encoders.Managed(Encoder(), cpu, cpu), [img], compatible=True)
    torch.testing.assert_close(seen[0], torch.from_numpy(original_pixels(img.image, 42))[None], atol=1e-5, rtol=0)


def test_extreme_aspect_keeps_the_smallest_short_side_instead_of_failing():
    assert flex_image.compat_resize_size(1000, 50) == (512, 64)  # the original asks PIL for 512x0 and fails
    assert flex_image.compat_resize_size(50, 1000) == (64, 512)
    assert forge_encoders.compat_pixels(ImageInput(photo(1000, 50)), 224).shape == (1, 3, 224, 224)
