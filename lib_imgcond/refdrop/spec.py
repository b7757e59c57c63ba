"""RefDrop's parameters (UI order = positional API order)."""

from __future__ import annotations

from lib_imgcond.refdrop.batch import SETS
from lib_imgcond.spec.params import Param, Spec

SPEC = Spec(
    "refdrop",
    "RefDrop",
    [
        Param(
            "mode",
            "Mode",
            "choice",
            "Record",
            choices=("Record", "Use", "Image", "Batch"),
            info="Record: store this generation's self-attention as the reference. Use: blend it in. "
            "Image: take the reference from the uploaded image (one extra UNet pass per step) and blend it in. "
            "Batch: consistent batch, the images of one batch attend to each other's tokens (no recording).",
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
            "record_every",
            "Record every k-th evaluation",
            "int",
            1,
            1,
            16,
            1,
            xyz=True,
            info="Record: keep the K/V of every k-th model evaluation only (about 1/k of the size); Use maps each "
            "evaluation to the recorded one nearest in progress. 1 = all",
            advanced=True,
        ),
        Param(
            "rate",
            "Shared token rate r (mode Batch)",
            "float",
            0.5,
            0.0,
            1.0,
            0.01,
            xyz=True,
            info="the share of the other images' tokens each image also attends to (a seeded random subset)",
            advanced=True,
        ),
        Param(
            "prompt_lines",
            "Prompt lines (mode Batch)",
            "str",
            "",
            info="optional: line j is added to the prompt of batch image j (one character, different scenes)",
            infotext=False,
            advanced=True,
        ),
        Param(
            "batch_sets",
            "Batches (mode Batch)",
            "choice",
            SETS[0],
            choices=SETS,
            info="with batch count > 1: the later batches attend to the first batch's tokens",
            advanced=True,
        ),
        Param(
            "storage",
            "Reference storage",
            "choice",
            "K/V",
            choices=("K/V", "Trajectory"),
            xyz=True,
            info="Record: 'K/V' keeps every self-attention K/V (GiBs, fastest Use); 'Trajectory' keeps only the model "
            "inputs (a few MB: latents, sigmas, conditioning) and Use replays them, one extra model pass per step",
            advanced=True,
        ),
    ],
)
