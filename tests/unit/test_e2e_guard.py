"""The e2e guard refuses degenerate images and NaN reports, so no e2e comparison can pass on a black image."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.e2e import forge, guard, webui


def _png(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def test_a_noise_image_passes_and_is_counted():
    before = guard.COUNTS["images"]
    img = _noise()
    assert guard.check_image(img) is img
    assert guard.COUNTS["images"] == before + 1


@pytest.mark.parametrize(
    ("img", "match"),
    [
        (np.zeros((64, 64, 3), np.uint8), r"constant \(0 everywhere\)"),  # a NaN latent decodes to black
        (np.full((64, 64, 3), 200, np.uint8), r"constant \(200 everywhere\)"),
        (np.full((64, 64), 100, np.uint8) + (np.arange(64) % 2).astype(np.uint8), "nearly flat"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "non-finite"),
        (np.zeros((0, 3)), "empty"),
    ],
)
def test_degenerate_images_are_refused(img, match):
    before = guard.COUNTS["images"]
    with pytest.raises(guard.DegenerateImage, match=match):
        guard.check_image(img, "the image")
    assert guard.COUNTS["images"] == before


def test_every_decoded_response_image_is_checked():
    body = {"images": [_png(_noise()), _png(np.zeros((64, 64, 3), np.uint8))], "info": json.dumps({})}
    with pytest.raises(guard.DegenerateImage, match="image 1 of the response is constant"):
        forge.Result(body)
    assert len(forge.Result({"images": [_png(_noise(1))]}).images) == 1


NEO_LOG = """Moving model(s) has taken 0.01 seconds
  0%|          | 0/3 [00:00<?, ?it/s]Encountered NaN in Latent
100%|##########| 3/3 [00:04<00:00,  1.5s/it]
"""
FORGE_LOG = "modules.devices.NansException: A tensor with NaNs was produced in Unet.\n"


def test_nan_reports_in_a_server_log_are_found(tmp_path):
    srv = webui.ForgeServer.__new__(webui.ForgeServer)
    srv.log_path = tmp_path / "server.log"
    srv.log_path.write_text("Startup time: 12.3s\nModel loaded in 2.1s (Nano banana, nanny, NANDA)\n")
    assert srv.nan_lines() == []  # words that merely contain the letters do not count
    mark = srv.log_size()
    with open(srv.log_path, "a") as f:
        f.write(NEO_LOG + FORGE_LOG)
    found = srv.nan_lines(mark)
    assert len(found) == 2 and "Encountered NaN in Latent" in found[0] and "NansException" in found[1]
    assert srv.nan_lines(srv.log_size()) == []  # only what came after the mark
