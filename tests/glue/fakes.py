"""Small fakes of the documented Forge API (shared/docs forge-api.md B, C), enough to drive our glue without Forge."""

from __future__ import annotations

import copy
from types import SimpleNamespace

BLOCKS = {
    "input": [(i, 0) for i in (1, 2, 4, 5, 7, 8)],
    "middle": [(0, 0)],
    "output": [(i, 0) for i in range(3, 12)],
}


class FakeUnetPatcher:
    """Mirrors backend/patcher: clone() copies lists and deep-copies model_options."""

    def __init__(self, diffusion_model=None):
        self.model = SimpleNamespace(diffusion_model=diffusion_model or SimpleNamespace(config={"model_channels": 320}))
        self.model_options = {"transformer_options": {}}
        self.clones = 0

    def clone(self):
        n = FakeUnetPatcher.__new__(FakeUnetPatcher)
        n.model = self.model
        n.model_options = copy.deepcopy(self.model_options)
        n.clones = self.clones + 1
        return n

    def _to(self):
        return self.model_options["transformer_options"]

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        to = self._to().setdefault("patches_replace", {}).setdefault(name, {})
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        to[key] = patch

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn1", block_name, number, transformer_index)

    def set_model_replace_all(self, patch, target="attn1"):
        for block_name in ("input", "middle", "output"):
            for number in range(16):
                for transformer_index in range(16):
                    self.set_model_patch_replace(patch, target, block_name, number, transformer_index)

    def add_conditioning_modifier(self, modifier, ensure_uniqueness=False):
        mods = self.model_options.setdefault("conditioning_modifiers", [])
        if ensure_uniqueness and modifier in mods:
            return
        mods.append(modifier)

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn

    def run_attn1(self, q, k, v, extra_options):
        """What backend/nn/unet.py does for a replaced attn1."""
        key = (extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])
        replaces = self._to().get("patches_replace", {}).get("attn1", {})
        fn = replaces.get(key) or replaces.get(key[:2])
        return fn(q, k, v, extra_options) if fn else None


class FakeEngine:
    def __init__(self, family="sd15"):
        self.is_sd1 = family == "sd15"
        self.is_sd2 = family == "sd2"
        self.is_sdxl = family == "sdxl"
        self.is_sd3 = False
        self.forge_objects = SimpleNamespace(unet=FakeUnetPatcher())


class Flux(FakeEngine):
    def __init__(self):
        super().__init__("flux")


def fake_p(family="sd15", **kw):
    engine = Flux() if family == "flux" else FakeEngine(family)
    p = SimpleNamespace(
        sd_model=engine, is_hr_pass=False, enable_hr=False, extra_generation_params={}, steps=3, batch_size=1
    )
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def fake_models_dir(monkeypatch, root) -> None:
    """Point forge.models_dir at `root` (a tmp folder), creating each subfolder asked for."""
    from lib_imgcond.host import forge as forge_host

    def models_dir(*parts):
        path = root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    monkeypatch.setattr(forge_host, "models_dir", models_dir)
