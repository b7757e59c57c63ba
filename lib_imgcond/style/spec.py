"""Style model (T2I-Adapter style)'s parameters (UI order = positional API order).

Global settings first (files, strength, step window), then four image slots with the same parameters, suffixed
with the slot number: `image1`, `weight1`, `mode1`, ..., `mode4`, then one optional mask per slot (`mask1` …
`mask4`, added later so positional calls written before keep their meaning). An image may also carry its mask
(`{"image", "mask"}` over the API); an uploaded or painted `maskk` wins over it.
"""

from __future__ import annotations

from lib_imgcond.redux.image import MODES
from lib_imgcond.spec.params import GALLERY_HINT, Param, Spec, step_window

SLOTS = 4
AUTO = "Automatic"
STRENGTH_TYPES = ("multiply", "attn_bias")
SLOT_FIELDS = ("image", "weight", "mode")


def slot_params(k: int) -> list[Param]:
    return [
        Param(
            f"image{k}",
            f"Style image {k}",
            "image",
            None,
            hint="A style image: its CLIP ViT-L/14 tokens become 8 style tokens appended to the prompt.",
        ),
        Param(
            f"weight{k}",
            f"Weight {k}",
            "float",
            1.0,
            0.0,
            2.0,
            0.01,
            xyz=True,
            info="0 = skipped",
            hint="This image's style tokens × weight; 0: the image is skipped.",
        ),
        Param(
            f"mode{k}",
            f"Image preparation {k}",
            "choice",
            "center_crop",
            choices=MODES,
            hint="How the image is fitted to the encoder's square input: center_crop: the centre square; "
            "keep_aspect: the whole image, letterboxed; autocrop: a square around the mask (needs a mask).",
        ),
    ]


def mask_param(k: int) -> Param:
    return Param(
        f"mask{k}",
        f"Mask {k} (optional; white = keep)",
        "image",
        None,
        hint="Optional, the image's size: only the image tokens under white are used, and autocrop crops around "
        "it. Upload one, or paint it with the brush button.",
    )


SPEC = Spec(
    "style_model",
    "Style model",
    [
        Param(
            "encoder",
            "CLIP ViT-L/14 vision encoder",
            "str",
            AUTO,
            info="in models/imgcond/clip_vision",
            hint="The CLIP ViT-L/14 vision encoder, found as for CLIP image guidance: a file in "
            "models/imgcond/clip_vision (or its extra folder). Automatic: the first fitting file.",
        ),
        Param(
            "adapter",
            "Style adapter",
            "str",
            AUTO,
            info="t2iadapter_style_sd14v1",
            hint="The T2I-Adapter style model (t2iadapter_style_sd14v1): a file in models/imgcond/style or "
            "models/ControlNet. Automatic: the first file of models/imgcond/style, else the first *style* file of "
            "models/ControlNet.",
        ),
        Param(
            "strength_type",
            "Strength type",
            "choice",
            "multiply",
            choices=STRENGTH_TYPES,
            hint="multiply: the style tokens are multiplied by Strength; attn_bias: log(Strength) is added to the "
            "cross-attention on the tokens' columns.",
        ),
        Param(
            "strength",
            "Strength",
            "float",
            1.0,
            0.0,
            10.0,
            0.01,
            xyz=True,
            info="0 = off",
            hint="How strongly the style tokens act (see Strength type); 0 removes them exactly.",
        ),
        Param(
            "margin",
            "Autocrop margin",
            "float",
            0.1,
            0.0,
            1.0,
            0.01,
            hint="autocrop: space kept around the mask's box, as a fraction of the image's width / height.",
        ),
        *step_window("fraction of the noise schedule"),
        Param("hires", "Hires pass too", "bool", True, hint="Also apply the style tokens in the hires-fix pass."),
        *(param for k in range(1, SLOTS + 1) for param in slot_params(k)),
        *(mask_param(k) for k in range(1, SLOTS + 1)),
    ],
    controls={
        "enabled": "T2I-Adapter style model (SD1.5): each style image's CLIP tokens become 8 tokens appended to the "
        "prompt.",
        "refresh": "Refresh the lists of model files",
        **{f"gallery_image{k}": GALLERY_HINT
           for k in range(1, SLOTS + 1)},
        **{f"paint{k}": f"Paint mask {k} on style image {k}: opens a canvas over the image; the painted mask "
           f"replaces mask {k} and is prepared as an uploaded one" for k in range(1, SLOTS + 1)},
    },
)  # fmt: skip


def slot_values(values: dict, k: int) -> dict:
    return {name: values[f"{name}{k}"] for name in SLOT_FIELDS}


def used_slots(values: dict) -> list[int]:
    """Slots with an image (whatever their weight)."""
    return [k for k in range(1, SLOTS + 1) if values[f"image{k}"] is not None]
