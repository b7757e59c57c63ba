"""CLIP image guidance (FlexDiffuse)'s parameters (UI order = positional API order).

Besides these, the named-dict API form accepts ``images``: a list of further guidance images, each an image or
``{"image": ..., "weight": w}`` (see :func:`split_images`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lib_imgcond.common.errors import ArgumentError
from lib_imgcond.spec.params import GALLERY_HINT, ImageInput, Param, Spec, decode_image, step_window

AUTO = "Automatic"
"""Encoder value meaning: the first file in the models folders whose projection fits the model."""

PRIORITY_LABELS = {"Best fit": "best_fit", "Text order": "text_order", "Direct": "direct"}
"""UI label → core priority name."""

MAX_EXTRA_IMAGES = 16

ENCODER_FOLDERS = "models/imgcond/clip_vision, models/clip_vision or models/ControlNetPreprocessor"

SPEC = Spec(
    "flexdiffuse",
    "CLIP image guidance",
    [
        Param(
            "image",
            "Guidance image",
            "image",
            None,
            hint="The guidance image: its CLIP vision tokens pull the prompt's tokens toward what the image shows.",
        ),
        Param(
            "weight",
            "Image weight",
            "float",
            1.0,
            -2.0,
            2.0,
            0.05,
            info="0 = off; < 0 pushes away",
            hint="How strongly this image guides the prompt; 0: the image is skipped; negative values push the "
            "prompt away from the image.",
        ),
        Param("image2", "Guidance image 2", "image", None, hint="A second guidance image, blended with the first."),
        Param(
            "weight2",
            "Image 2 weight",
            "float",
            1.0,
            -2.0,
            2.0,
            0.05,
            hint="How strongly the second image guides the prompt (0: skipped).",
        ),
        Param(
            "encoder",
            "CLIP ViT-L/14 vision encoder",
            "str",
            AUTO,
            info="768-d projection",
            hint=f"A CLIP ViT-L/14 vision encoder with a 768-d projection, in {ENCODER_FOLDERS}: SD1.5, and SDXL's "
            "CLIP-L half. Automatic: the first file whose projection fits.",
        ),
        Param(
            "encoder_g",
            "CLIP ViT-bigG/14 vision encoder (SDXL)",
            "str",
            AUTO,
            info="1280-d projection; SDXL only",
            hint=f"A CLIP ViT-bigG/14 vision encoder with a 1280-d projection, in {ENCODER_FOLDERS}: SDXL's CLIP-G "
            "half only. Automatic: the first file whose projection fits.",
        ),
        Param(
            "priority",
            "Mapping priority",
            "choice",
            "Best fit",
            choices=tuple(PRIORITY_LABELS),
            hint="Which image token each prompt token gets: Best fit: the best scores first; Text order: in prompt "
            "order; Direct: image token i to position i.",
            advanced=True,
        ),
        Param(
            "reuse",
            "Reuse image tokens",
            "bool",
            True,
            hint="One image token may guide several prompt tokens; off: each image token is used once.",
            advanced=True,
        ),
        Param(
            "threshold_mult",
            "Threshold match multiplier",
            "float",
            0.25,
            -1.0,
            1.0,
            0.01,
            xyz=True,
            hint="The weight of prompt tokens whose match score reaches the threshold floor.",
            advanced=True,
        ),
        Param(
            "threshold_floor",
            "Threshold match floor",
            "float",
            0.75,
            0.0,
            1.0,
            0.01,
            hint="The match score from which the threshold multiplier applies.",
            advanced=True,
        ),
        Param(
            "linear_start",
            "Linear start multiplier",
            "float",
            0.1,
            -1.0,
            1.0,
            0.01,
            hint="The guidance weight at the first token of each 77-token chunk (a linear ramp to the end value).",
            advanced=True,
        ),
        Param(
            "linear_end",
            "Linear end multiplier",
            "float",
            0.5,
            -1.0,
            1.0,
            0.01,
            xyz=True,
            hint="The guidance weight at the last token of each 77-token chunk (the end of the linear ramp).",
            advanced=True,
        ),
        Param(
            "clustered",
            "Clustered match multiplier",
            "float",
            0.15,
            -0.5,
            0.5,
            0.01,
            xyz=True,
            hint="The weight added around the best-matching prompt tokens.",
            advanced=True,
        ),
        Param(
            "max_guidance",
            "Max image guidance",
            "float",
            0.35,
            0.0,
            1.0,
            0.01,
            xyz=True,
            info="cap on every positive weight",
            hint="The cap on every positive guidance weight: the most any prompt token moves toward the image.",
        ),
        Param(
            "header_max",
            "Max header guidance",
            "float",
            0.0,
            0.0,
            1.0,
            0.01,
            hint="The cap on the start token's weight (0: the start token is left alone).",
            advanced=True,
        ),
        Param(
            "concept",
            "Concept mapping prompt",
            "str",
            "",
            hint="Words of the prompt to replace: prompt tokens matching them (score above the concept threshold) "
            "are replaced by image tokens.",
            advanced=True,
        ),
        Param(
            "concept_threshold",
            "Concept match threshold",
            "float",
            0.9,
            0.0,
            1.0,
            0.01,
            hint="The match score from which a prompt token counts as one of the concept's words.",
            advanced=True,
        ),
        Param(
            "direct",
            "Direct image guidance (ignore the prompt)",
            "bool",
            False,
            hint="The image tokens replace the positive prompt; the multipliers do not apply.",
            advanced=True,
        ),
        Param(
            "compatible",
            "FlexDiffuse-compatible",
            "bool",
            False,
            hint="Reproduce the original FlexDiffuse's off-by-one mapping and image preprocessing (default: "
            "corrected).",
            advanced=True,
        ),
        *step_window("fraction of the sampling (by noise level)", advanced=True),
        Param("hires", "Hires pass too", "bool", True, hint="Also guide the hires-fix pass.", advanced=True),
    ],
    controls={
        "enabled": "CLIP image guidance (FlexDiffuse): pull the prompt's tokens toward the CLIP tokens of a guidance "
        "image (SD1.5, SDXL).",
        "refresh": "Refresh the list of encoders",
        "add_image2": "Show the controls of a second guidance image",
        "gallery_image": GALLERY_HINT,
        "gallery_image2": GALLERY_HINT,
    },
)


def split_images(args: Sequence[Any]) -> tuple[list[Any], list[tuple[ImageInput, float]]]:
    """Take the API-only ``images`` list out of a named-dict argument.

    Returns the arguments for :meth:`Spec.parse` and the decoded extra images with their weights (default 1).
    Positional arguments pass through unchanged with no extra images.
    """
    args = list(args)
    if not args or not isinstance(args[0], Mapping) or "images" not in args[0]:
        return args, []
    named = dict(args[0])
    raw = named.pop("images")
    if raw is None:
        raw = []
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise ArgumentError(f"{SPEC.prefix}.images", type(raw).__name__, "a list of images or {image, weight} dicts")
    if len(raw) > MAX_EXTRA_IMAGES:
        raise ArgumentError(f"{SPEC.prefix}.images", f"{len(raw)} images", f"at most {MAX_EXTRA_IMAGES}")
    weight_param = SPEC.by_name["weight"]
    extra: list[tuple[ImageInput, float]] = []
    for i, item in enumerate(raw):
        name = f"{SPEC.prefix}.images[{i}]"
        weight = 1.0
        if isinstance(item, Mapping) and "weight" in item:
            unknown = sorted(set(item) - {"image", "weight"})
            if unknown:
                raise ArgumentError(f"{name}.{unknown[0]}", item[unknown[0]], "only 'image' and 'weight'")
            weight = weight_param.coerce(item["weight"], f"{name}.weight")
            item = item.get("image")
        image = decode_image(item, name)
        if image is None:
            raise ArgumentError(name, item, "an image (base64 string)")
        extra.append((image, weight))
    return [named, *args[1:]], extra
