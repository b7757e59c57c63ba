"""The DiT families RefDrop serves: their layer groups, how their references are tagged, and what they are called.

A DiT reference is tagged with its base family and its layer shapes, `base:n1+n2…@channels` (one count per layer
group): 'flux:19+38@3072' for Flux.1 (19 double- and 38 single-stream blocks, 3072 attention channels),
'zimage:30@3840' for Z-Image. A reference is never used on a model with another tag. Which modules of a model form
the groups, and where their image tokens sit, is the host's knowledge (`host/dit_sites`); this table is the pure side.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from lib_imgcond.common.errors import ImgcondError


@dataclass(frozen=True)
class DitFamily:
    base: str  # the host's family key (`host.forge.model_family`)
    label: str
    groups: tuple[str, ...]  # layer groups in execution order, as users write them in `layers`
    patch: int = 16  # image pixels per token side (VAE downscale × patch size)
    what: str = ""  # the attention RefDrop blends, for the README's family table
    pixel_space: bool = False  # the model's latent is the image itself, in [-1, 1] (no VAE between them)


FLUX_GROUPS = ("double", "single")
_JOINT = "joint text + image attention of every block; image tokens blended, the prompt's tokens kept"
_JOINT_EDIT = _JOINT + "; Qwen-Image-Edit's reference-image tokens kept as context"
_SELF = "self-attention over the image tokens of every block (text enters by cross-attention)"
_VIDEO = "self-attention over the video tokens (every frame) of every block (text enters by cross-attention)"
_EDIT = _JOINT + " (an edit's reference-image tokens kept too)"
_PID = (
    "joint text + image attention of every patch block (image tokens blended, the prompt's kept) and the "
    "self-attention over the image patches of every pixel block"
)

DIT = {
    f.base: f
    for f in (
        DitFamily("flux", "Flux", FLUX_GROUPS, what=_JOINT),
        DitFamily("chroma", "Chroma", FLUX_GROUPS, what=_JOINT),
        DitFamily("flux2", "Flux.2", FLUX_GROUPS, what=_EDIT),
        DitFamily("zimage", "Z-Image", ("layers",), what=_JOINT),
        DitFamily("lumina2", "Lumina 2", ("layers",), what=_JOINT),
        DitFamily("qwen_image", "Qwen-Image", ("blocks",), patch=16, what=_JOINT_EDIT),
        DitFamily("krea2", "Krea 2", ("blocks",), what=_JOINT),  # VAE 8 × patch 2
        DitFamily("ernie_image", "ERNIE-Image", ("layers",), what=_JOINT),  # VAE 16 × patch 1
        DitFamily("anima", "Anima", ("blocks",), what=_SELF),  # Wan VAE (8×) × patch 2
        DitFamily("wan", "Wan", ("blocks",), what=_VIDEO),  # Wan 2.1 and 2.2 A14B; per frame: Wan VAE (8×) × patch 2
        DitFamily("pid", "PiD", ("patch", "pixel"), patch=16, what=_PID, pixel_space=True),
    )
}

_TAG = re.compile(r"(?P<base>[a-z0-9_]+):(?P<counts>\d+(?:\+\d+)*)@(?P<channels>\d+)")


def dit_family(base: str, counts: Sequence[int], channels: int) -> str:
    """The tag of a DiT model from its base family, its block count per group and its attention channels."""
    fam = DIT.get(base)
    if fam is None:
        raise ImgcondError(f"RefDrop supports the DiT families {', '.join(DIT)}, not {base!r}")
    if len(counts) != len(fam.groups):
        raise ImgcondError(f"{fam.label} has the layer groups {', '.join(fam.groups)}, not {len(counts)} counts")
    return f"{base}:{'+'.join(str(int(n)) for n in counts)}@{int(channels)}"


def dit_shape(family: str) -> tuple[str, tuple[int, ...], int] | None:
    """(base, block count per group, channels) of a DiT family tag; None for a UNet family or an unknown base."""
    m = _TAG.fullmatch(family)
    if m is None or m["base"] not in DIT:
        return None
    counts = tuple(int(n) for n in m["counts"].split("+"))
    return (m["base"], counts, int(m["channels"])) if len(counts) == len(DIT[m["base"]].groups) else None


def dit_label(family: str) -> str | None:
    """'Flux (19 double + 38 single blocks, 3072 channels)', 'Z-Image (30 blocks, 3840 channels)'."""
    dit = dit_shape(family)
    if dit is None:
        return None
    base, counts, channels = dit
    fam = DIT[base]
    if len(counts) == 1:
        return f"{fam.label} ({counts[0]} blocks, {channels} channels)"
    parts = " + ".join(f"{n} {g}" for n, g in zip(counts, fam.groups, strict=True))
    return f"{fam.label} ({parts} blocks, {channels} channels)"
