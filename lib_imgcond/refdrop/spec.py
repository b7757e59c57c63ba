"""RefDrop's parameters (UI order = positional API order), with the panel's hover hints."""

from __future__ import annotations

from lib_imgcond.refdrop.batch import SETS
from lib_imgcond.spec.params import GALLERY_HINT, Param, Spec

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
            hint="Record: store this generation's self-attention as the reference named below. Use: blend that "
            "reference into this generation. Image: take the reference from the uploaded image (one extra UNet pass "
            "per step), blend it in and keep it under the name. Batch: consistent batch, the images of one batch "
            "attend to each other's tokens (nothing is recorded).",
        ),
        Param(
            "reference",
            "Reference",
            "str",
            "reference",
            xyz=True,
            hint="The reference's name: Record and Image store under it (a Record replaces an older one of that "
            "name), Use reads it from memory or from models/imgcond/refdrop. Not used by Batch.",
        ),
        Param(
            "coefficient",
            "RFG coefficient c",
            "float",
            0.3,
            -1.0,
            1.0,
            0.01,
            xyz=True,
            info="> 0: toward the reference; < 0: away from it",
            hint="Each self-attention becomes (1 − c) · own + c · attention over the reference's K/V. Above 0 the "
            "image keeps the reference's look (subject, style); below 0 it is pushed away from it for diversity; "
            "0 has no effect. Batch: c of the shared-token attention.",
        ),
        Param(
            "more_references",
            "More references (name:c, ...)",
            "str",
            "",
            info="e.g. 'cat:0.3, dog:-0.2'",
            hint="Use / Image: blend further references at once, each with its own coefficient, "
            "Σ c_j · Attn_j + (1 − Σ c_j) · Attn. Names and coefficients separated by ':' and entries by ','.",
            advanced=True,
        ),
        Param(
            "layers",
            "Layers",
            "str",
            "all",
            info="'all', 'output:0-5, middle', 'double:0-18' …",
            hint="Which self-attention layers are recorded (Record) or blended (Use). UNet: 'input', 'middle', "
            "'output', with index ranges such as 'output:0-5'; Flux and DiTs: 'double:0-18, single:0-37' and the "
            "like. The output blocks carry most of the look; fewer layers make smaller references.",
            advanced=True,
        ),
        Param(
            "start",
            "Start at",
            "float",
            0.0,
            0.0,
            1.0,
            0.01,
            info="fraction of the sampling steps",
            hint="Use / Image / Batch: blending starts at this fraction of the sampling steps (0 = the first step). "
            "Starting later keeps the composition free and borrows only the details.",
            advanced=True,
        ),
        Param(
            "end",
            "End at",
            "float",
            1.0,
            0.0,
            1.0,
            0.01,
            hint="Use / Image / Batch: blending stops at this fraction of the sampling steps (1 = until the last).",
            advanced=True,
        ),
        Param(
            "hires",
            "Hires pass too",
            "bool",
            False,
            hint="Record / use the hires-fix pass as well (a Record then holds both passes; Use blends the hires "
            "pass only when the reference has one).",
            advanced=True,
        ),
        Param(
            "uncond",
            "Uncond branch too",
            "bool",
            False,
            hint="Record / blend the negative-prompt (uncond) branch as well; by default only the cond branch is "
            "recorded and blended, which halves the size of a Record.",
            advanced=True,
        ),
        Param(
            "save",
            "Save to file",
            "bool",
            False,
            info="Record: also to models/imgcond/refdrop",
            hint="Record / Image: also write the reference to models/imgcond/refdrop/<name>.safetensors, so it "
            "survives a restart; otherwise it lives in this WebUI's memory only.",
        ),
        Param(
            "batch_item",
            "Batch item to record",
            "int",
            0,
            0,
            63,
            1,
            hint="Record: which image of the batch (0 = the first) becomes the reference; below the batch size.",
            advanced=True,
        ),
        Param(
            "image",
            "Reference image (mode Image)",
            "image",
            None,
            hint="Mode Image: the reference image. It is VAE-encoded at the generation's size, noised to each "
            "step's level and run through the model once more per step; its self-attention is blended in and kept "
            "under the reference name.",
        ),
        Param(
            "record_every",
            "Record every k-th evaluation",
            "int",
            1,
            1,
            16,
            1,
            xyz=True,
            info="1 = all",
            hint="Record: keep the K/V of every k-th model evaluation only (about 1/k of the size); Use maps each "
            "evaluation to the recorded one nearest in progress.",
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
            hint="Mode Batch: the share of the other images' tokens each image also attends to (the same seeded "
            "random subset for K and V, new per layer and step); 0: no effect.",
            advanced=True,
        ),
        Param(
            "prompt_lines",
            "Prompt lines (mode Batch)",
            "str",
            "",
            info="line j → batch image j",
            hint="Mode Batch, optional: line j is appended to the prompt of batch image j (one character in "
            "different scenes); blank lines leave a prompt alone; the infotext shows each image's real prompt.",
            infotext=False,
            advanced=True,
        ),
        Param(
            "batch_sets",
            "Batches (mode Batch)",
            "choice",
            SETS[0],
            choices=SETS,
            hint="Mode Batch with batch count > 1: each batch shares tokens within itself, or the first batch keeps "
            "a pooled share of its tokens and the later batches attend to those (host RAM, within the RAM budget).",
            advanced=True,
        ),
        Param(
            "storage",
            "Reference storage",
            "choice",
            "K/V",
            choices=("K/V", "Trajectory"),
            xyz=True,
            info="K/V: GiBs, fastest Use; Trajectory: a few MB",
            hint="Record: 'K/V' keeps every self-attention K/V (GiBs, fastest Use); 'Trajectory' keeps only the "
            "model inputs (latents, sigmas, conditioning: a few MB) and Use replays them, one extra model pass per "
            "step (SD1.5, SDXL).",
            advanced=True,
        ),
    ],
    controls={
        "enabled": "RefDrop (reference feature guidance): record a generation's self-attention as a named "
        "reference, then blend it into later generations for a consistent subject or style.",
        "refresh": "Refresh the list of references (memory and models/imgcond/refdrop)",
        "delete": "Delete this reference from memory and its file",
        "estimate": "Estimate the size a Record takes with the current settings",
        "record": "Record the result selected in this tab's gallery (else its first image) as this reference: "
        "switches to mode Image with that image; the next generation keeps it under the name (no rerun of the "
        "original generation)",
        "gallery_image": GALLERY_HINT,
        "thumbnails": "The recorded image of every reference that has one, named below it",
        "new_name": "The new name for the reference chosen above",
        "rename": "Rename the reference chosen above (its file too)",
    },
)
