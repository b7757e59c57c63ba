"""Style model (T2I-Adapter style)'s parameters (UI order = positional API order).

Global settings first (files, strength, step window), then four image slots with the same parameters, suffixed
with the slot number: `image1`, `weight1`, `mode1`, ..., `mode4`. An image may carry a mask (`{"image", "mask"}`
over the API, drawn in the UI).
"""

from __future__ import annotations

from lib_imgcond.redux.image import MODES
from lib_imgcond.spec.params import Param, Spec, step_window

SLOTS = 4
AUTO = "Automatic"
STRENGTH_TYPES = ("multiply", "attn_bias")
SLOT_FIELDS = ("image", "weight", "mode")


def slot_params(k: int) -> list[Param]:
    return [
        Param(f"image{k}", f"Style image {k}", "image", None),
        Param(
            f"weight{k}",
            f"Weight {k}",
            "float",
            1.0,
            0.0,
            2.0,
            0.01,
            xyz=True,
            info="this image's tokens × weight; 0 = the image is skipped",
        ),
        Param(
            f"mode{k}",
            f"Image preparation {k}",
            "choice",
            "center_crop",
            choices=MODES,
            info="center_crop: square centre crop; keep_aspect: letterbox; autocrop: square around the mask",
        ),
    ]


SPEC = Spec(
    "style_model",
    "Style model",
    [
        Param(
            "encoder",
            "CLIP ViT-L/14 vision encoder",
            "str",
            AUTO,
            info="file in models/imgcond/clip_vision (as CLIP image guidance)",
        ),
        Param(
            "adapter",
            "Style adapter",
            "str",
            AUTO,
            info="file in models/imgcond/style or models/ControlNet (t2iadapter_style_sd14v1)",
        ),
        Param(
            "strength_type",
            "Strength type",
            "choice",
            "multiply",
            choices=STRENGTH_TYPES,
            info="multiply: tokens × strength; attn_bias: log(strength) on the tokens' cross-attention columns",
        ),
        Param("strength", "Strength", "float", 1.0, 0.0, 10.0, 0.01, xyz=True, info="0 removes the tokens exactly"),
        Param("margin", "Autocrop margin", "float", 0.1, 0.0, 1.0, 0.01),
        *step_window("fraction of the noise schedule"),
        Param("hires", "Hires pass too", "bool", True, info="also apply in the hires-fix pass"),
        *(param for k in range(1, SLOTS + 1) for param in slot_params(k)),
    ],
)


def slot_values(values: dict, k: int) -> dict:
    return {name: values[f"{name}{k}"] for name in SLOT_FIELDS}


def used_slots(values: dict) -> list[int]:
    """Slots with an image (whatever their weight)."""
    return [k for k in range(1, SLOTS + 1) if values[f"image{k}"] is not None]
