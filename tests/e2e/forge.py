"""The WebUI installation the e2e suite drives, its checkpoints, and the API's requests and results.

The WebUI installation is read from the environment (see docs/testing.md, "End-to-end tests"); it may be Forge 2.0 or
Forge Neo, told apart by `host_kind` (the start flags, the settings file and the hires upscaler differ):

    IMGCOND_FORGE_DIR      the WebUI's folder: Forge 2.0 (launch.py, backend/, repositories/ with its three cloned
                           repositories) or Forge Neo (launch.py, backend/, modules_forge/packages/ vendored)
    IMGCOND_FORGE_PYTHON   the python of Forge's virtual environment
    IMGCOND_SD15_CKPT      optional: an SD1.5 checkpoint; a seeded random one is generated when unset
    IMGCOND_SDXL_CKPT      optional: an SDXL checkpoint for the SDXL tests; generated when unset
    IMGCOND_E2E_CACHE      optional: where generated checkpoints are kept (default ~/.cache/sd-webui-imgcond-e2e)

The server process itself (start, stop, HTTP, log) is tests/e2e/webui.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np

from tests.e2e import guard

REPO = Path(__file__).resolve().parents[2]
EXT_NAME = "sd-webui-imgcond"
# A traceback is ours when one of its frames is in this extension's code (not merely under a folder named imgcond-*)
OURS = re.compile("|".join(re.escape(s) for s in (f"/{EXT_NAME}/", "lib_imgcond", str(REPO) + "/")))
SKIP_REASON = (
    "end-to-end tests need a Forge installation: set IMGCOND_FORGE_DIR to Forge's folder and IMGCOND_FORGE_PYTHON "
    "to the python of its virtual environment (docs/testing.md, 'End-to-end tests')"
)


def forge_paths() -> tuple[Path, Path] | None:
    forge, python = os.environ.get("IMGCOND_FORGE_DIR"), os.environ.get("IMGCOND_FORGE_PYTHON")
    if not forge or not python:
        return None
    forge_dir, py = Path(forge).expanduser(), Path(python).expanduser()
    if not (forge_dir / "launch.py").is_file():
        raise RuntimeError(f"IMGCOND_FORGE_DIR={forge_dir} has no launch.py")
    if not py.exists():
        raise RuntimeError(f"IMGCOND_FORGE_PYTHON={py} does not exist")
    return forge_dir, py


def host_kind(forge_dir: Path | None = None) -> str:
    """'neo' for Forge Neo (it vendors huggingface_guess, k_diffusion… in modules_forge/packages), else 'forge'."""
    if forge_dir is None:
        paths = forge_paths()
        if paths is None:
            return "none"
        forge_dir = paths[0]
    return "neo" if (forge_dir / "modules_forge" / "packages").is_dir() else "forge"


def is_neo() -> bool:
    return host_kind() == "neo"


def neo_version_uid(forge_dir: Path) -> str:
    """The settings version Neo's launcher waits for (it prompts on stdin without it)."""
    text = (forge_dir / "modules" / "launch_utils.py").read_text(errors="replace")
    found = re.search(r'VERSION_UID\s*(?::[^=]*)?=\s*"([^"]+)"', text)
    return found.group(1) if found else "PY313"


def hires_upscaler() -> str:
    """An upscaler that needs no model file: Forge 2.0's latent one; Neo has no latent upscalers ('None' is a
    Lanczos resize of the decoded image, then a VAE encode)."""
    return "None" if is_neo() else "Latent"


def cache_dir() -> Path:
    path = Path(os.environ.get("IMGCOND_E2E_CACHE", "~/.cache/sd-webui-imgcond-e2e")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint(arch: str) -> Path:
    """The checkpoint for `arch` ('sd15' or 'sdxl'): from the environment, or generated once into the cache. The
    file name carries a digest of the generator, so a cache left by an older generator is never used."""
    given = os.environ.get(f"IMGCOND_{arch.upper()}_CKPT")
    if given:
        return Path(given).expanduser()
    generator = REPO / "tests" / "e2e" / "make_checkpoint.py"
    out = cache_dir() / f"imgcond-random-{arch}-{hashlib.sha256(generator.read_bytes()).hexdigest()[:10]}.safetensors"
    if not out.exists():
        forge_dir, py = forge_paths()
        subprocess.run(
            [str(py), str(generator), "--arch", arch, "--out", str(out)],
            cwd=forge_dir,
            env=offline_env(),
            check=True,
            timeout=900,
        )
    return out


def offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return env


class GenerationError(AssertionError):
    def __init__(self, status: int, body: dict):
        self.status, self.body = status, body
        super().__init__(f"HTTP {status}: {json.dumps(body)[:2000]}")


class Result:
    def __init__(self, body: dict):
        self.body = body
        self.info = json.loads(body.get("info") or "{}")
        self.images = [
            guard.check_image(decode(b), f"image {i} of the response") for i, b in enumerate(body.get("images", []))
        ]

    @property
    def infotext(self) -> str:
        return (self.info.get("infotexts") or [""])[0]

    @property
    def image(self) -> np.ndarray:
        return self.images[0]


def decode(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def encode(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


BASE = {
    "prompt": "a photo of a cat",
    "negative_prompt": "",
    "steps": 3,
    "width": 64,
    "height": 64,
    "sampler_name": "Euler a",
    "scheduler": "Automatic",
    "cfg_scale": 7,
    "seed": 1,
    "batch_size": 1,
    "n_iter": 1,
    "send_images": True,
    "save_images": False,
}


def payload(**kw) -> dict:
    out = dict(BASE)
    out.update(kw)
    if out.get("enable_hr"):
        out.setdefault("hr_additional_modules", ["Use same choices"])
        out.setdefault("hr_scale", 2)
        out.setdefault("hr_upscaler", hires_upscaler())
        out.setdefault("hr_second_pass_steps", 2)
        out.setdefault("denoising_strength", 0.5)
    return out


def with_script(body: dict, title: str, args) -> dict:
    body = dict(body)
    scripts = dict(body.get("alwayson_scripts") or {})
    scripts[title] = {"args": args}
    body["alwayson_scripts"] = scripts
    return body
