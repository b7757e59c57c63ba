"""The extension's one logger."""

from __future__ import annotations

import logging

logger = logging.getLogger("sd_webui_imgcond")

if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[ImgCond] %(levelname)s: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
