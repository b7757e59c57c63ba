"""RefDrop's parameters (UI order = positional API order)."""

from __future__ import annotations

from lib_imgcond.ui.spec import Param, Spec

SPEC = Spec(
    "refdrop",
    "RefDrop",
    [
        Param(
            "mode",
            "Mode",
            "choice",
            "Record",
            choices=("Record", "Use", "Image"),
            info="Record: store this generation's self-attention as the reference. Use: blend it in. "
            "Image: take the reference from the uploaded image (one extra UNet pass per step) and blend it in.",
        ),
        Param("reference", "Reference", "str", "reference", xyz=True),
        Param(
            "coefficient",
            "RFG coefficient c",
            "float",
            0.3,
            -1.0,
            1.0,
            0.01,
            xyz=True,
            info="> 0: consistency with the reference; < 0: diversity away from it; 0: no effect",
        ),
        Param(
            "more_references",
            "More references (name:c, ...)",
            "str",
            "",
            info="blend several references at once, e.g. 'cat:0.3, dog:-0.2'",
            advanced=True,
        ),
        Param(
            "layers",
            "Layers",
            "str",
            "all",
            info="'all'; UNet: 'input, middle, output' or 'output:0-5, middle'; Flux: 'double:0-18, single:0-37'",
            advanced=True,
        ),
        Param("start", "Start at", "float", 0.0, 0.0, 1.0, 0.01, info="fraction of the sampling steps", advanced=True),
        Param("end", "End at", "float", 1.0, 0.0, 1.0, 0.01, advanced=True),
        Param("hires", "Hires pass too", "bool", False, info="record / use the hires-fix pass as well", advanced=True),
        Param(
            "uncond",
            "Uncond branch too",
            "bool",
            False,
            info="record / blend the negative-prompt branch as well (cond only by default)",
            advanced=True,
        ),
        Param(
            "save",
            "Save to file",
            "bool",
            False,
            info="Record: also write the reference to models/imgcond/refdrop (kept across restarts)",
        ),
        Param("batch_item", "Batch item to record", "int", 0, 0, 63, 1, advanced=True),
        Param("image", "Reference image (mode Image)", "image", None),
        Param(
            "storage",
            "Reference storage",
            "choice",
            "K/V",
            choices=("K/V", "Trajectory"),
            info="Record: 'K/V' keeps every self-attention K/V (GiBs, fastest Use); 'Trajectory' keeps only the model "
            "inputs (a few MB: latents, sigmas, conditioning) and Use replays them, one extra model pass per step",
            advanced=True,
        ),
    ],
)
