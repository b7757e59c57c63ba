"""unCLIP's parameters (UI order = positional API order): the encoder, the merge level and the step window, then four
image slots (`image1`, `strength1`, `noise_augmentation1`, ..., `noise_augmentation4`)."""

from __future__ import annotations

from lib_imgcond.spec.params import GALLERY_HINT, Param, Spec, step_window

SLOTS = 4
AUTO = "Automatic"
SLOT_FIELDS = ("image", "strength", "noise_augmentation")


def slot_params(k: int) -> list[Param]:
    return [
        Param(
            f"image{k}",
            f"Image {k}",
            "image",
            None,
            hint="An image whose CLIP embedding conditions the unCLIP model (its ADM input).",
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
            info="0 = skipped",
            hint="This image's ADM vector × strength; 0: the image is skipped.",
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
            info="higher = looser",
            hint="How far the image embedding is noised (level = round(999 × this)): higher values follow the "
            "image more loosely.",
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
            info="ViT-H/14 for -h, ViT-L/14 for -l",
            hint="A CLIP vision encoder in models/imgcond/clip_vision matching the checkpoint: ViT-H/14 (1024-d) for "
            "-h checkpoints, ViT-L/14 (768-d) for -l. Automatic: the first fitting file.",
        ),
        Param(
            "merge_noise_augmentation",
            "Merge noise augmentation",
            "float",
            0.05,
            0.0,
            1.0,
            0.01,
            hint="With several images: their summed embedding is noised once more at this level.",
        ),
        *step_window("fraction of the noise schedule"),
        *(param for k in range(1, SLOTS + 1) for param in slot_params(k)),
    ],
    controls={
        "enabled": "unCLIP: image conditioning of SD2.1 unCLIP checkpoints (sd21-unclip-h / -l).",
        "refresh": "Refresh the list of encoder files",
        **{f"gallery_image{k}": GALLERY_HINT
           for k in range(1, SLOTS + 1)},
    },
)  # fmt: skip


def used_slots(values: dict) -> list[int]:
    return [k for k in range(1, SLOTS + 1) if values[f"image{k}"] is not None]
