"""The size a RefDrop Record will take, estimated before it runs from the UI's generation settings.

The panel's 📏 button sends the tab's width, height, steps, batch size (a Wan clip's frames), sampler and hires
settings (`GEN_FIELDS`); this module stands them up as the processing object `forge_refdrop.estimate_record` reads
(the same `_estimate` the budget check uses) with the loaded model, and words the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host import video
from lib_imgcond.memory.arena import format_bytes
from lib_imgcond.refdrop import forge_refdrop as host

# generation setting -> the suffix of its component's elem_id after "txt2img_" / "img2img_" (hires: txt2img only)
GEN_FIELDS = {
    "width": "width",
    "height": "height",
    "steps": "steps",
    "batch_size": "batch_size",  # on Neo's Wan engine: the clip's frames
    "sampler_name": "sampling",
    "enable_hr": "hr",
    "hr_scale": "hr_scale",
    "hr_resize_x": "hr_resize_x",
    "hr_resize_y": "hr_resize_y",
    "hr_second_pass_steps": "hires_steps",
}


def generation_p(sd_model: Any, gen: Mapping[str, Any]) -> SimpleNamespace:
    """A stand-in for the processing object of a generation with these UI settings."""
    width, height = int(gen.get("width") or 512), int(gen.get("height") or 512)
    rx, ry = int(gen.get("hr_resize_x") or 0), int(gen.get("hr_resize_y") or 0)
    if rx or ry:  # "resize to": a missing side keeps the aspect ratio
        rx, ry = rx or round(ry * width / height), ry or round(rx * height / width)
    else:
        scale = float(gen.get("hr_scale") or 2.0)
        rx, ry = int(width * scale), int(height * scale)
    return SimpleNamespace(
        sd_model=sd_model,
        width=width,
        height=height,
        steps=int(gen.get("steps") or 20),
        sampler_name=str(gen.get("sampler_name") or ""),
        batch_size=int(gen.get("batch_size") or 1),
        enable_hr=bool(gen.get("enable_hr")),
        hr_upscale_to_x=rx,
        hr_upscale_to_y=ry,
        hr_second_pass_steps=int(gen.get("hr_second_pass_steps") or 0),
    )


def record_size_line(sd_model: Any, gen: Mapping[str, Any], values: Mapping[str, Any], precision: str) -> str:
    """'Record size: about 1.23 GiB (…)' for a Record with these RefDrop values, or why there is no estimate."""
    if sd_model is None:
        return "Record size: load a checkpoint first."
    p = generation_p(sd_model, gen)
    try:
        nbytes = host.estimate_record(p, dict(values), precision)
    except ImgcondError as e:
        return f"Record size: ⚠️ {e}"
    every = int(values.get("record_every") or 1)
    parts = [f"{p.width}×{p.height}", f"{p.steps} steps", f"{precision} storage"]
    frames = video.clip_frames(p)
    if frames is not None:
        parts.insert(1, f"a clip of {frames} latent frame{'s' if frames > 1 else ''}")
    if every > 1:
        parts.append(f"every {every}-th model evaluation")
    if p.enable_hr and values.get("hires"):
        parts.append(f"hires {p.hr_upscale_to_x}×{p.hr_upscale_to_y}")
    return f"Record size: about **{format_bytes(nbytes)}** ({', '.join(parts)})"
