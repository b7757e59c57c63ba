"""Redux control's parameters (UI order = positional API order).

Global settings come first (model files, step window), then four reference-image slots with the same parameters,
suffixed with the slot number: `image1`, `mask1`, `mode1`, ..., `image4`, ..., `strength4`. Parameters added later
follow, again per slot (`automerge1`, `merge_threshold1`, ..., `merge_threshold4`), so positional API calls written
for the earlier layout keep their meaning.
"""

from __future__ import annotations

from lib_imgcond.redux.image import MODES
from lib_imgcond.redux.tokens import DOWNSAMPLE_MODES, PRESETS
from lib_imgcond.spec.params import Param, Spec, step_window

SLOTS = 4
AUTO = ""  # a model name left empty: the only (or first) file of the models folders
CONTROLS = (*PRESETS, "advanced")
STRENGTH_TYPES = ("multiply", "attn_bias")
BASE_FIELDS = (
    "use",
    "image",
    "mask",
    "mode",
    "margin",
    "control",
    "factor",
    "interpolation",
    "weight",
    "strength_type",
    "strength",
)
MERGE_FIELDS = ("automerge", "merge_threshold")
SLOT_FIELDS = (*BASE_FIELDS, *MERGE_FIELDS)
"""Every per-slot parameter name (without the number), in the order of one slot's UI."""


def slot_params(k: int) -> list[Param]:
    """The first-generation parameters of reference-image slot `k` (1-based): BASE_FIELDS."""
    return [
        Param(f"use{k}", f"Use image {k}", "bool", True, info="a slot is used when this is on and it has an image"),
        Param(f"image{k}", f"Image {k}", "image", None),
        Param(f"mask{k}", f"Mask {k} (optional upload; white = keep)", "image", None),
        Param(
            f"mode{k}",
            "Image preparation",
            "choice",
            "center_crop",
            choices=MODES,
            info="center_crop: square centre crop; keep_aspect: letterbox; autocrop: square around the mask",
            advanced=True,
        ),
        Param(f"margin{k}", "Autocrop margin", "float", 0.1, 0.0, 1.0, 0.01, advanced=True),
        Param(
            f"control{k}",
            "Token control",
            "choice",
            "medium",
            choices=CONTROLS,
            info="highest…lowest: fixed downsampling (729/169/81/36/25 tokens); advanced: factor, interpolation, "
            "mask → token selection",
            advanced=True,
        ),
        Param(f"factor{k}", f"Downsampling factor {k}", "float", 3.0, 1.0, 9.0, 0.1, xyz=True, advanced=True),
        Param(f"interpolation{k}", "Interpolation", "choice", "area", choices=DOWNSAMPLE_MODES, advanced=True),
        Param(f"weight{k}", f"Weight {k}", "float", 1.0, 0.0, 1.0, 0.01, xyz=True, info="tokens × weight²"),
        Param(
            f"strength_type{k}",
            "Strength type",
            "choice",
            "multiply",
            choices=STRENGTH_TYPES,
            info="multiply: tokens × strength; attn_bias: log(strength) on the tokens' attention columns",
            advanced=True,
        ),
        Param(f"strength{k}", f"Strength {k}", "float", 1.0, 0.0, 10.0, 0.01, xyz=True),
    ]


def merge_params(k: int) -> list[Param]:
    """Token merging of slot `k` (MERGE_FIELDS), placed after every slot's BASE_FIELDS in the positional order."""
    return [
        Param(
            f"automerge{k}",
            "Merge similar tokens",
            "bool",
            False,
            info="average runs of neighbouring tokens (raster order) whose cosine similarity reaches the threshold",
            advanced=True,
        ),
        Param(
            f"merge_threshold{k}",
            f"Merge threshold {k}",
            "float",
            0.8,
            0.0,
            1.0,
            0.005,
            xyz=True,
            info="lower merges more (0.8 often leaves about as many tokens as a prompt); 1: identical only",
            advanced=True,
        ),
    ]


SPEC = Spec(
    "redux",
    "Redux control",
    [
        Param(
            "siglip",
            "SigLIP vision model",
            "str",
            AUTO,
            info="file in models/imgcond/siglip, clip_vision or ControlNetPreprocessor (empty: the first SigLIP file)",
        ),
        Param(
            "redux_model",
            "Redux model",
            "str",
            AUTO,
            info="file in models/imgcond/redux (empty: the only / first file there)",
        ),
        *step_window("fraction of the sampling steps", advanced=True),
        *(param for k in range(1, SLOTS + 1) for param in slot_params(k)),
        *(param for k in range(1, SLOTS + 1) for param in merge_params(k)),
    ],
)


def slot_values(values: dict, k: int) -> dict:
    """Slot `k`'s values without the number suffix: {"use": ..., "image": ..., ...}."""
    return {name: values[f"{name}{k}"] for name in SLOT_FIELDS}


def expand_images(named: dict) -> dict:
    """The alternative named-dict form `{"images": [{...slot 1...}, {...slot 2...}]}` → flat `image1`, `mode1`, ...
    Entries take the slot field names without a number (`image`, `mask`, `mode`, `factor`, ...)."""
    if "images" not in named:
        return named
    from lib_imgcond.common.errors import ArgumentError

    out = {k: v for k, v in named.items() if k != "images"}
    items = named["images"]
    if not isinstance(items, list) or len(items) > SLOTS or not all(isinstance(i, dict) for i in items):
        raise ArgumentError("redux.images", f"{type(items).__name__}", f"a list of at most {SLOTS} objects")
    for k, item in enumerate(items, start=1):
        unknown = sorted(set(item) - set(SLOT_FIELDS))
        if unknown:
            raise ArgumentError(
                f"redux.images[{k - 1}].{unknown[0]}", item[unknown[0]], "one of " + ", ".join(SLOT_FIELDS)
            )
        for name, value in item.items():
            out[f"{name}{k}"] = value
    for k in range(len(items) + 1, SLOTS + 1):
        out.setdefault(f"use{k}", False)
    return out


def automerge_paster(k: int):
    """Paste-back of `automerge{k}`: its key is written only when slot k merged, so a Redux infotext without it means
    off (None, "leave the checkbox alone", only for infotexts without Redux)."""
    param = SPEC.by_name[f"automerge{k}"]
    key = SPEC.key(param.name)

    def paste(params: dict):
        if key in params:
            return param.from_infotext(params[key])
        return False if params.get(SPEC.enabled_key) in (True, "True", "true") else None

    return paste
