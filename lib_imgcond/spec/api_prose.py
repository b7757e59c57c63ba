"""The API reference's prose: a meaning per argument of each technique, and the allowed values where a type alone
does not say them (names, kinds, defaults and ranges come from the specs; lib_imgcond.spec.api_docs renders both)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Doc:
    meaning: str = ""  # empty: the spec's info
    allowed: str = ""  # empty: from the spec (range, choices, kind)
    note: str = ""  # appended to the spec's allowed values


LAYERS = (
    "`all`, `input`, `middle`, `output`, `output:0-5`, `input:0,2` … (SD1.5: input 0–5, middle 0, output 0–8; "
    "SDXL: input 0–23, middle 0–9, output 0–35); Flux: `double`, `single`, `double:0-18`, `single:0-37` … "
    "(Flux.1: double 0–18, single 0–37)"
)

DOCS: dict[str, dict[str, Doc]] = {
    "refdrop": {
        "mode": Doc(
            "`Record`: store this generation's self-attention K/V as `reference`; `Use`: blend references into it; "
            "`Image`: take the reference from `image` (the UNet runs once more per evaluation, on the image noised "
            "to that evaluation's level) and blend it in; `Batch`: consistent batch, no reference: inside one batch "
            "every image's self-attention also attends to a seeded random share `rate` of the other images' tokens, "
            "`out_i = (1−c)·Attn(Q_i,K_i,V_i) + c·Attn(Q_i,[K_i; S(K_others)],[V_i; S(V_others)])` (batch size ≥ 2; "
            "on Flux and Chroma image tokens only)"
        ),
        "reference": Doc("the reference to record into or to use (not used by `Batch`)", "a file-safe name"),
        "coefficient": Doc("RFG coefficient c of `reference`; `Batch`: c of the shared-token attention"),
        "more_references": Doc(
            "Use / Image: further references, each with its own c: `Σ c_j·Attn_j + (1−Σ c_j)·Attn`", "`name:c, name:c`"
        ),
        "layers": Doc("Record: which layers to store; Use: which layers to blend", LAYERS),
        "start": Doc("Use / Image / Batch: start of the step window, as a fraction of the sampling steps"),
        "end": Doc("Use / Image / Batch: end of the step window"),
        "hires": Doc("record / use the hires-fix pass too"),
        "uncond": Doc("record / blend the negative-prompt branch too (cond only by default)"),
        "save": Doc("Record / Image: also write `models/imgcond/refdrop/<reference>.safetensors`"),
        "batch_item": Doc("Record: which image of the batch becomes the reference", note=", below the batch size"),
        "image": Doc("mode Image: the reference image (VAE-encoded at the generation's size)", "base64 image or null"),
        "rate": Doc(
            "Batch: the share r of the other images' tokens each image attends to (the same random subset for K and "
            "V, seeded by the batch's seed, new per layer and evaluation); 0: no effect"
        ),
        "prompt_lines": Doc(
            "Batch: line j is appended (after `, `) to the prompt of image j of every batch, before conditioning; "
            "the infotext shows each image's real prompt; blank lines leave a prompt alone",
            "text, at most one line per batch image",
        ),
        "batch_sets": Doc(
            "Batch, batch count > 1: each batch shares tokens within itself, or the first batch keeps a pooled "
            "share `rate` of its tokens per layer and evaluation (host RAM, within the RAM budget) and the images of "
            "later batches attend to those instead"
        ),
        "record_every": Doc(
            "Record: keep the K/V of every k-th model evaluation only (about 1/k of the size); Use maps each "
            "evaluation to the recorded one nearest in progress. 1 = all"
        ),
        "storage": Doc(
            "Record: `K/V` stores every self-attention K/V (GiBs; Use reads them); `Trajectory` stores the model "
            "inputs of the recorded image (latent, sigma and conditioning per evaluation; SDXL 1024² 20 steps: "
            "6.5 MB) and Use replays them through the model, one extra model pass per step (SD1.5, SDXL)"
        ),
    },
    "hrmix": {
        "schedule": Doc("curve of the weight on the noised upscaled latent z′ over the hires steps"),
        "alpha": Doc("DemoFusion cosine_scale_1; larger = mixing fades out sooner"),
        "start": Doc("fraction of the hires steps; no mixing before"),
        "stop": Doc("curve end; > 1 stretches it past the last step"),
        "clamp": Doc("no mixing from this fraction of the steps on"),
        "blend_max": Doc("z′ weight where the curve is 1"),
        "normalize": Doc("match the mixed latent's per-channel mean/std to z′"),
        "fresh_noise": Doc("a new ε every step, not the pass's"),
        "order": Doc(
            "demofusion: mix before each step, at its noise level; iterative_mixer: mix after each step's update"
        ),
        "rewind": Doc("then re-noise the result and sample again from later steps"),
        "rewind_min": Doc("each rewind starts this fraction of the remaining steps later (0.5: 50 %, 75 %, …)"),
        "rewind_max": Doc("no rewind starts after this fraction"),
        "blend": Doc(
            "how z′ and the sampler's latent x are combined: `addition` (linear), `slerp` (spherical), `norm_only` "
            "(x's direction at z′'s norm)"
        ),
        "blend_min": Doc("z′ weight where the curve is 0", note=" (at most `blend_max`)"),
    },
    "flexdiffuse": {
        "image": Doc("guidance image", "base64 image or null"),
        "weight": Doc("its weight (0 = skipped)"),
        "image2": Doc("second guidance image", "base64 image or null"),
        "weight2": Doc("its weight"),
        "encoder": Doc(
            "ViT-L/14 encoder (768-d projection); `Automatic`: among the files whose projection fits, the first (by "
            "name) of the standard architecture, else the first that fits",
            "a file name in the folders, or `Automatic`",
        ),
        "encoder_g": Doc(
            "ViT-bigG/14 encoder (1280-d; SDXL only); `Automatic` as for `encoder`", "a file name, or `Automatic`"
        ),
        "priority": Doc("mapping priority: best scores first, prompt order, or image token i to position i"),
        "reuse": Doc("an image token may serve several prompt tokens"),
        "threshold_mult": Doc("threshold match multiplier"),
        "threshold_floor": Doc("score from which the threshold weight applies"),
        "linear_start": Doc("linear ramp at the first token of a chunk"),
        "linear_end": Doc("linear ramp at the last token of a chunk"),
        "clustered": Doc("clustered match multiplier"),
        "max_guidance": Doc("cap on positive weights"),
        "header_max": Doc("cap on the start token's weight"),
        "concept": Doc("concept mapping prompt"),
        "concept_threshold": Doc("concept match threshold"),
        "direct": Doc("direct image guidance (ignores the prompt)"),
        "compatible": Doc("FlexDiffuse-compatible mode (the original's mapping and image preprocessing)"),
        "start": Doc("start of the window (fraction of the noise schedule, tested per model evaluation)"),
        "end": Doc("end of the window (`end` = `start`: never applies)", note=", at least `start`"),
        "hires": Doc("guide the hires-fix pass too"),
    },
    "redux": {
        "siglip": Doc(
            "SigLIP vision encoder",
            "a file name in `models/imgcond/siglip/` (or an extra folder, `models/clip_vision/`, "
            '`models/ControlNetPreprocessor/`); `""` = the first SigLIP file found',
        ),
        "redux_model": Doc(
            "Redux projector", 'a file name in `models/imgcond/redux/`; `""` = the first Redux file found'
        ),
        "start": Doc("start of the step window (fraction of the noise schedule, tested per model evaluation)"),
        "end": Doc("end of the step window (`end` = `start`: never applies)", note=", at least `start`"),
        "use": Doc("slot k is used when on and `imagek` is given"),
        "image": Doc("reference image k", 'base64 image, or `{"image", "mask"}`'),
        "mask": Doc("uploaded mask k (white = keep); same size as the image", "base64 image"),
        "mode": Doc("image preparation"),
        "margin": Doc("autocrop margin (fraction of width / height)"),
        "control": Doc("token control: a preset (729 / 169 / 81 / 36 / 25 tokens) or `advanced`"),
        "factor": Doc("advanced: downsampling factor"),
        "interpolation": Doc("advanced: downsampling interpolation"),
        "weight": Doc("tokens × weight²"),
        "strength_type": Doc("how `strengthk` acts"),
        "strength": Doc("strength"),
        "automerge": Doc("merge runs of similar neighbouring tokens (raster order) into their mean"),
        "merge_threshold": Doc("cosine similarity to the run's mean from which a token joins it"),
    },
    "style_model": {
        "encoder": Doc(
            "CLIP ViT-L/14 vision encoder, found as for CLIP image guidance's `encoder`",
            "a file name in `models/imgcond/clip_vision/` (or its extra folder), or `Automatic`",
        ),
        "adapter": Doc(
            "T2I-Adapter style model; `Automatic`: the first file of `models/imgcond/style/`, else the first "
            "`*style*` file of `models/ControlNet/`",
            "a `.safetensors` or `.pth` file name, or `Automatic`",
        ),
        "strength": Doc("strength of every style token (0 removes them exactly)"),
        "margin": Doc("autocrop margin (fraction of width / height)"),
        "start": Doc("start of the step window (fraction of the noise schedule, tested per model evaluation)"),
        "end": Doc("end of the step window (`end` = `start`: never applies)", note=", at least `start`"),
        "image": Doc(
            "style image k (a drawn / given mask keeps only the tokens it covers)",
            'base64 image, or `{"image", "mask"}`',
        ),
        "weight": Doc("its tokens × weight (0: the image is skipped)"),
        "mode": Doc("image preparation"),
        "strength_type": Doc(
            "multiply: tokens × strength; attn_bias: log(strength) on the tokens' cross-attention columns"
        ),
        "hires": Doc("also apply in the hires-fix pass"),
        "mask": Doc(
            "mask k (white = keep), the size of `imagek`: uploaded or painted in the UI; wins over a mask carried "
            "by `imagek`",
            "base64 image or null",
        ),
    },
    "unclip": {
        "encoder": Doc(
            "CLIP vision encoder matching the checkpoint (ViT-H/14, 1024-d, for -h; ViT-L/14, 768-d, for -l); "
            "`Automatic`: the first fitting file, the standard architecture first",
            "a file name in `models/imgcond/clip_vision/` (or its extra folder), or `Automatic`",
        ),
        "start": Doc("start of the step window (fraction of the noise schedule, tested per model evaluation)"),
        "end": Doc("end of the step window (`end` = `start`: never applies)", note=", at least `start`"),
        "image": Doc("image k", "base64 image or null"),
        "merge_noise_augmentation": Doc("several images: the summed embedding is noised once more at this level"),
        "strength": Doc("this image's ADM vector × strength; 0 = the image is skipped"),
        "noise_augmentation": Doc("how far the image embedding is noised (level = round(999 × this)); higher = looser"),
    },
}

EXTRA_ROWS: dict[str, list[tuple[str, str, str, str, str]]] = {
    # arguments of the named-dict form that are not spec parameters: (name, type, default, allowed, meaning)
    "flexdiffuse": [
        ("images", "list", "`[]`", 'up to 16 images or `{"image", "weight"}`', "further images (dict form only)")
    ],
    "redux": [
        (
            "images",
            "list",
            "absent",
            "up to 4 objects with the slot names without the number",
            "the slots as a list (dict form only; slots not listed are switched off)",
        )
    ],
}
