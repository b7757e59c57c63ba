"""unCLIP's parameters (UI order = positional API order): the encoder, the merge level and the step window, then four
image slots (`image1`, `strength1`, `noise_augmentation1`, ..., `noise_augmentation4`)."""

from __future__ import annotations

from lib_imgcond.spec.params import Param, Spec, step_window

SLOTS = 4
AUTO = "Automatic"
SLOT_FIELDS = ("image", "strength", "noise_augmentation")


def slot_params(k: int) -> list[Param]:
    return [
        Param(f"image{k}", f"Image {k}", "image", None),
        Param(
            f"strength{k}",
            f"Strength {k}",
            "float",
            1.0,
            0.0,
            10.0,
            0.01,
            xyz=True,
            info="this image's ADM vector × strength; 0 = the image is skipped",
        ),
        Param(
            f"noise_augmentation{k}",
            f"Noise augmentation {k}",
            "float",
            0.0,
            0.0,
            1.0,
            0.01,
            xyz=True,
            info="how far the image embedding is noised (level = round(999 × this)); higher = looser",
        ),
    ]


SPEC = Spec(
    "unclip",
    "unCLIP",
    [
        Param(
            "encoder",
            "CLIP vision encoder",
            "str",
            AUTO,
            info="file in models/imgcond/clip_vision: ViT-H/14 (1024-d) for -h checkpoints, ViT-L/14 (768-d) for -l",
        ),
        Param(
            "merge_noise_augmentation",
            "Merge noise augmentation",
            "float",
            0.05,
            0.0,
            1.0,
            0.01,
            info="several images: the summed embedding is noised once more at this level",
        ),
        *step_window("fraction of the noise schedule"),
        *(param for k in range(1, SLOTS + 1) for param in slot_params(k)),
    ],
)


def used_slots(values: dict) -> list[int]:
    return [k for k in range(1, SLOTS + 1) if values[f"image{k}"] is not None]
