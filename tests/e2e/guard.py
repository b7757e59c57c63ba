"""The e2e suite's guard against degenerate evidence.

An "identical" assertion between two black images passes without testing anything, and a "differs" assertion fails
for the wrong reason. So every image the harness decodes from a server is checked here (finite, not constant, a
minimum spread), and every server log is scanned for the hosts' NaN reports. The counts are printed at the end of a
run (tests/e2e/conftest.py), so a run shows how much it checked.
"""

from __future__ import annotations

import re

import numpy as np

# A random-weight checkpoint's image is colourful noise (std ~50-70 on 0..255); a NaN latent decodes to black, an
# overflowing one to a flat colour. 4 is far below any real image of the suite and far above a constant one.
MIN_STD = 4.0
# Neo: "Encountered NaN in Latent"; Forge 2.0 (without --disable-nan-check): NansException, "A tensor with NaNs was
# produced in Unet/VAE".
NAN_LOG = re.compile(r"\bNaNs?\b|NansException")

COUNTS = {"images": 0, "logs": 0}


class DegenerateImage(AssertionError):
    pass


def check_image(img, where: str = "an image") -> np.ndarray:
    """Fail unless `img` (H×W or H×W×C, any numeric dtype) is finite, not constant and spread by at least MIN_STD;
    return it. Counted in COUNTS["images"]."""
    arr = np.asarray(img)
    if arr.size == 0:
        raise DegenerateImage(f"{where} is empty (shape {arr.shape})")
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise DegenerateImage(f"{where} has {int((~np.isfinite(values)).sum())} non-finite values")
    low, high, std = float(values.min()), float(values.max()), float(values.std())
    if low == high:
        raise DegenerateImage(f"{where} is constant ({low:g} everywhere): a NaN or overflowed generation")
    if std < MIN_STD:
        raise DegenerateImage(f"{where} is nearly flat (std {std:.2f} < {MIN_STD}, range {low:g}..{high:g})")
    COUNTS["images"] += 1
    return arr


def nan_lines(log: str) -> list[str]:
    """The lines of a server log that report NaN. Counted in COUNTS["logs"]."""
    COUNTS["logs"] += 1
    return [line for line in log.splitlines() if NAN_LOG.search(line)]


def summary() -> str:
    images, logs = COUNTS["images"], COUNTS["logs"]
    checks = f"finite, not constant, std >= {MIN_STD:g}"
    return f"e2e guard: {images} images checked ({checks}), {logs} server-log scans for NaN"
