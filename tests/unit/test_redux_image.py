"""Redux control: reference-image preparation (letterbox, centre crop, autocrop, masks) (CPU, small tensors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.redux.image import _autocrop_box, prepare
from lib_imgcond.redux.tokens import (
    downsample,
    select,
    token_count,
    token_mask,
)
from tests.redux_tensors import D, tokens

# ----------------------------------------------------------------------------------------------- preparation


def test_v4_keep_aspect_letterbox_tokens():
    image = torch.rand(3, 500, 1000, generator=torch.Generator().manual_seed(5))
    img, mask = prepare(image, None, "keep_aspect")
    assert img.shape == (3, 384, 384)
    assert mask.shape == (384, 384)
    rows = torch.nonzero(mask.sum(1) > 0).flatten()
    assert (rows.min().item(), rows.max().item()) == (96, 287)
    torch.testing.assert_close(mask[96:288], torch.ones(192, 384))
    assert torch.all(img[:, :96] == 0)
    assert torch.all(img[:, 288:] == 0)
    assert img.min() >= 0 and img.max() <= 1

    tm = token_mask(mask, 14)
    assert tm.shape == (27, 27)
    in_rows = torch.nonzero(tm.sum(1) > 0).flatten().tolist()
    assert in_rows == list(range(6, 21))
    t = tokens()
    assert select(*downsample(t, 1, "area", tm)).shape == (1, 405, D)
    assert select(*downsample(t, 3, "area", tm)).shape == (1, 45, D)
    assert token_count(1, "area", tm) == 405
    assert token_count(3, "bicubic", tm) == 45


def test_v5_center_crop_offsets():
    image = torch.rand(3, 512, 768, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(512, 768)
    mask[:, 128:640] = 1.0  # → columns 96..479 after scaling by 0.75, exactly the crop window
    img, m = prepare(image, mask, "center_crop")
    resized = F.interpolate(image[None], size=(384, 576), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(img, resized[0].clamp(0, 1)[:, :, 96:480])
    assert m.shape == (384, 384)
    assert torch.all(m[:, 2:382] > 0.99)
    img2, m2 = prepare(image, None, "center_crop")
    assert m2 is None
    torch.testing.assert_close(img2, img)


def test_v5_autocrop_box():
    mask = torch.zeros(1000, 1000)
    mask[500, 500] = 1.0
    assert _autocrop_box(mask, 0.1, 384) == (308, 308, 692, 692)
    image = torch.rand(3, 1000, 1000, generator=torch.Generator().manual_seed(7))
    img, m = prepare(image, mask, "autocrop", margin=0.1)
    assert torch.equal(img, image[:, 308:692, 308:692])  # 384² box: no rescale
    assert m.shape == (384, 384)
    assert m[192, 192] == 1.0
    assert m.sum() == 1.0


def test_autocrop_pushes_against_borders_and_fits_small_images():
    mask = torch.zeros(1000, 1000)
    mask[10, 990] = 1.0
    assert _autocrop_box(mask, 0.0, 384) == (616, 0, 1000, 384)
    small = torch.zeros(200, 300)
    small[50:60, 50:60] = 1.0
    assert _autocrop_box(small, 0.1, 384) == (0, 0, 300, 200)
    img, m = prepare(torch.rand(3, 200, 300), small, "autocrop")
    assert img.shape == (3, 384, 384)
    assert m.shape == (384, 384)
    big = torch.zeros(1000, 1000)
    big[100:900, 200:300] = 1.0
    x0, y0, x1, y1 = _autocrop_box(big, 0.0, 384)
    assert (x1 - x0, y1 - y0) == (799, 799)


def test_v7_mask_in_last_six_columns_selects_nothing():
    image = torch.rand(3, 384, 384)
    mask = torch.zeros(384, 384)
    mask[:, 378:] = 1.0
    img, m = prepare(image, mask, "center_crop")
    assert torch.equal(img, image)
    tm = token_mask(m, 14)
    assert tm.shape == (27, 27)
    assert tm.sum() == 0
    assert select(tokens(), tm).shape == (1, 0, D)
    assert token_count(1, "area", tm) == 0
    assert token_count(3, "area", tm) == 0


def test_mask_outside_the_crop_window_but_ringing_into_it_selects_nothing():
    """500×300, centre crop, mask rows H/4..H/2 × columns W−W/5..W: bicubic ringing leaves ~0.09 in the crop's last
    pixel columns, which no patch of the 27×14 grid covers. Judged on pixels the mask looks non-empty; judged on the
    token mask that is used (patch given) it selects nothing and is refused."""
    width, height = 500, 300
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(height, width)
    mask[height // 4 : height // 2, width - width // 5 : width] = 1.0
    _img, m = prepare(image, mask, "center_crop")  # pixel check only (the old, silent behaviour)
    assert 0.05 < float(m[:, 378:].max()) < 0.2 and float(m[:, :378].max()) == 0.0
    assert token_mask(m, 14).sum() == 0
    with pytest.raises(ImgcondError, match=r"selects no token: it is outside the centre-crop window.*last 6 pixel"):
        prepare(image, mask, "center_crop", patch=14)
    inside = torch.zeros(height, width)
    inside[height // 4 : height // 2, width // 2 : width // 2 + 20] = 1.0  # inside the window: still accepted
    _img, m = prepare(image, inside, "center_crop", patch=14)
    assert token_mask(m, 14).sum() > 0
    with pytest.raises(ArgumentError, match="patch"):
        prepare(image, mask, "center_crop", patch=0)


def test_mask_errors():
    image = torch.rand(3, 500, 1000)
    with pytest.raises(ImgcondError, match="autocrop needs a mask"):
        prepare(image, None, "autocrop")
    with pytest.raises(ImgcondError, match="empty"):
        prepare(image, torch.zeros(500, 1000), "keep_aspect")
    with pytest.raises(ImgcondError, match=r"999×500 pixels but the image is 1000×500"):
        prepare(image, torch.ones(500, 999), "center_crop")
    outside = torch.zeros(500, 1000)
    outside[:, :50] = 1.0  # the centre crop keeps columns 250..749
    with pytest.raises(ImgcondError, match="outside the centre-crop window"):
        prepare(image, outside, "center_crop")
    with pytest.raises(ArgumentError, match="image"):
        prepare(torch.rand(500, 1000), None, "keep_aspect")


@pytest.mark.parametrize("mode", ["center_crop", "keep_aspect", "autocrop"])
def test_prepared_mask_has_one_shape(mode):
    image = torch.rand(3, 300, 500)
    mask = torch.zeros(1, 300, 500)  # a leading 1 is accepted
    mask[0, 100:200, 200:300] = 1.0
    img, m = prepare(image, mask, mode, size=56)
    assert img.shape == (3, 56, 56)
    assert m.shape == (56, 56)
    assert img.dtype == m.dtype == torch.float32
    assert m.min() >= 0 and m.max() <= 1


def test_patch16_size_512():
    _img, m = prepare(torch.rand(3, 600, 800), None, "keep_aspect", size=512)
    tm = token_mask(m, 16)
    assert tm.shape == (32, 32)
    assert token_count(3, "area", tm, grid=32) == select(*downsample(tokens(n=1024), 3, "area", tm)).shape[1]
