"""Redux control's parameters (UI order = positional API order).

Global settings come first (model files, step window), then four reference-image slots with the same parameters,
suffixed with the slot number: `image1`, `mask1`, `mode1`, ..., `image4`, ..., `strength4`. Parameters added later
follow, again per slot (`automerge1`, `merge_threshold1`, ..., `merge_threshold4`), so positional API calls written
for the earlier layout keep their meaning.
"""

from __future__ import annotations

from lib_imgcond.redux.image import MODES
from lib_imgcond.redux.tokens import DOWNSAMPLE_MODES, PRESETS
from lib_imgcond.spec.params import GALLERY_HINT, Param, Spec, step_window

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
        Param(
            f"use{k}",
            f"Use image {k}",
            "bool",
            True,
            hint="A slot is used when this is on and it has an image: switch a slot off without losing its image.",
        ),
        Param(
            f"image{k}",
            f"Image {k}",
            "image",
            None,
            hint="A reference image: the SigLIP encoder and the Redux projector turn it into conditioning tokens "
            "appended after the prompt's.",
        ),
        Param(
            f"mask{k}",
            f"Mask {k} (optional upload; white = keep)",
            "image",
            None,
            hint="Optional, the image's size: white keeps, black drops. With Token control 'advanced' only the "
            "tokens under white are kept; 'autocrop' crops around it. Upload one, or paint it with the brush button.",
        ),
        Param(
            f"mode{k}",
            "Image preparation",
            "choice",
            "center_crop",
            choices=MODES,
            hint="How the image is fitted to the encoder's square input: center_crop: the centre square; "
            "keep_aspect: the whole image, letterboxed; autocrop: a square around the mask (needs a mask).",
            advanced=True,
        ),
        Param(
            f"margin{k}",
            "Autocrop margin",
            "float",
            0.1,
            0.0,
            1.0,
            0.01,
            info="fraction of width / height",
            hint="autocrop: space kept around the mask's box, as a fraction of the image's width / height.",
            advanced=True,
        ),
        Param(
            f"control{k}",
            "Token control",
            "choice",
            "medium",
            choices=CONTROLS,
            info="729 / 169 / 81 / 36 / 25 tokens; advanced",
            hint="How many tokens the image gives: the presets highest…lowest downsample the 27×27 token grid to "
            "729 / 169 / 81 / 36 / 25 tokens; fewer tokens leave the prompt more say. advanced: your own factor "
            "and interpolation, and the mask selects tokens.",
            advanced=True,
        ),
        Param(
            f"factor{k}",
            f"Downsampling factor {k}",
            "float",
            3.0,
            1.0,
            9.0,
            0.1,
            xyz=True,
            hint="advanced: the token grid is shrunk by this factor per side (1 = all 729 tokens, 3 = 81).",
            advanced=True,
        ),
        Param(
            f"interpolation{k}",
            "Interpolation",
            "choice",
            "area",
            choices=DOWNSAMPLE_MODES,
            hint="advanced: how the token grid is downsampled (area averages each cell's tokens).",
            advanced=True,
        ),
        Param(
            f"weight{k}",
            f"Weight {k}",
            "float",
            1.0,
            0.0,
            1.0,
            0.01,
            xyz=True,
            info="tokens × weight²",
            hint="Scales this image's tokens by weight² (the Redux convention); 0 silences the image.",
        ),
        Param(
            f"strength_type{k}",
            "Strength type",
            "choice",
            "multiply",
            choices=STRENGTH_TYPES,
            hint="multiply: the tokens are multiplied by Strength; attn_bias: log(Strength) is added to the "
            "attention on the tokens' columns (the image's share of attention grows without changing the tokens).",
            advanced=True,
        ),
        Param(
            f"strength{k}",
            f"Strength {k}",
            "float",
            1.0,
            0.0,
            10.0,
            0.01,
            xyz=True,
            hint="How strongly this image conditions the generation (see Strength type); 1 = as encoded, 0 = off.",
        ),
    ]


def merge_params(k: int) -> list[Param]:
    """Token merging of slot `k` (MERGE_FIELDS), placed after every slot's BASE_FIELDS in the positional order."""
    return [
        Param(
            f"automerge{k}",
            "Merge similar tokens",
            "bool",
            False,
            hint="Average runs of neighbouring tokens (raster order) whose cosine similarity reaches the threshold: "
            "fewer tokens for flat regions, the detail kept.",
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
            info="lower merges more; 1: identical only",
            hint="The cosine similarity to the run's mean from which a token joins it. Lower merges more (0.8 often "
            "leaves about as many tokens as a prompt); 1 merges identical tokens only.",
            advanced=True,
        ),
    ]


def slot_controls(k: int) -> dict[str, str]:
    """The hover hints of slot `k`'s controls that are not parameters."""
    out = {
        f"gallery_image{k}": GALLERY_HINT,
        f"paint{k}": f"Paint mask {k} on image {k}: opens a canvas over the image; the painted mask replaces mask "
        f"{k} and is prepared as an uploaded one",
        f"preview{k}": "Show image and mask as the encoder will see them, and the exact token count (encodes the "
        "image once)",
        f"prepared{k}": "The image as prepared for the encoder (press Preview)",
        f"prepared_mask{k}": "The mask as prepared for the encoder (press Preview)",
    }
    if k > 1:
        out[f"add_image{k}"] = f"Show the controls of reference image {k}"
    return out


SPEC = Spec(
    "redux",
    "Redux control",
    [
        Param(
            "siglip",
            "SigLIP vision model",
            "str",
            AUTO,
            info="empty: the first SigLIP file",
            hint="The SigLIP vision encoder (sigclip_vision_patch14_384): a file in models/imgcond/siglip, "
            "models/clip_vision or models/ControlNetPreprocessor (or a folder set in Settings); empty: the first "
            "SigLIP file found.",
        ),
        Param(
            "redux_model",
            "Redux model",
            "str",
            AUTO,
            info="empty: the first file in models/imgcond/redux",
            hint="The Redux projector (flux1-redux-dev): a file in models/imgcond/redux; empty: the only / first "
            "file there.",
        ),
        *step_window("fraction of the sampling steps", advanced=True),
        *(param for k in range(1, SLOTS + 1) for param in slot_params(k)),
        *(param for k in range(1, SLOTS + 1) for param in merge_params(k)),
    ],
    controls={
        "enabled": "Flux Redux: reference images become extra conditioning tokens after the prompt (Flux only).",
        "refresh": "Refresh the lists of model files",
        **{name: hint for k in range(1, SLOTS + 1) for name, hint in slot_controls(k).items()},
    },
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
