"""FlexDiffuse-compatible preprocessing (core part): the original's resize size, crop box and errors."""

from __future__ import annotations

import pytest
import torch

from lib_imgcond.common.errors import ArgumentError
from lib_imgcond.flexdiffuse.image import center_crop_box, compat_pixels, compat_resize_size


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((500, 300), (512, 256)),  # 512·300/500 = 307.2 → 307 → 256
        ((300, 500), (256, 512)),
        ((640, 360), (512, 256)),  # 288 → 256
        ((1920, 1080), (512, 256)),
        ((768, 512), (512, 320)),  # 341.3 → 320
        ((333, 333), (512, 512)),
        ((100, 50), (512, 256)),  # small images are enlarged
        ((1000, 50), (512, 64)),  # the original floors to 0 and fails
    ],
)
def test_resize_size_floors_the_short_side_to_64(size, expected):
    assert compat_resize_size(*size) == expected


def test_crop_box_uses_torchvisions_rounding():
    assert center_crop_box(256, 512) == (0, 128, 256)
    assert center_crop_box(512, 320) == (96, 0, 320)
    assert center_crop_box(5, 2) == (2, 0, 2)  # round(1.5) = 2
    assert center_crop_box(7, 2) == (2, 0, 2)  # round(2.5) = 2 (banker's rounding, as Python and torchvision)


def test_pixels_shape_range_and_errors():
    x = torch.rand(1, 3, 256, 512, generator=torch.Generator().manual_seed(0))
    out = compat_pixels(x, 224)
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    # a plain [0, 1] → [-1, 1] map before CLIP's normalisation: black goes to (-1 - mean) / std
    black = compat_pixels(torch.zeros(1, 3, 64, 64), 64)
    torch.testing.assert_close(black[0, :, 0, 0], torch.tensor([-5.514861, -5.579078, -5.106337]), atol=1e-5, rtol=0)
    with pytest.raises(ArgumentError, match="image"):
        compat_pixels(torch.rand(3, 64, 64), 224)
    with pytest.raises(ArgumentError, match="width"):
        compat_resize_size(0, 10)
