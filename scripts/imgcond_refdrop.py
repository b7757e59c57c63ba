"""RefDrop accordion: thin glue between the WebUI and lib_imgcond (no maths here)."""

from __future__ import annotations

import gradio as gr
from modules import script_callbacks, scripts, shared
from modules.ui_components import InputAccordion

from lib_imgcond.common.errors import ArgumentError, ImgcondError
from lib_imgcond.common.log import logger
from lib_imgcond.host import forge, progress
from lib_imgcond.refdrop import forge_consistent, forge_install, forge_library, forge_patch
from lib_imgcond.refdrop import forge_estimate as estimate
from lib_imgcond.refdrop import forge_refdrop as host
from lib_imgcond.refdrop.spec import SPEC
from lib_imgcond.spec import registry
from lib_imgcond.webui import images, panel, script, xyz
from lib_imgcond.webui.settings import on_settings

registry.register(SPEC)


def _opt(name: str, default):
    return getattr(shared.opts, name, default) if hasattr(shared, "opts") else default


def _settings() -> dict:
    return dict(getattr(getattr(shared, "opts", None), "data", None) or {})


def _precision() -> str:
    return host.precision_from_settings(_settings())


class RefDropScript(script.TechniqueScript, scripts.Script):
    spec = SPEC
    sorting_priority = 20

    def __init__(self):
        super().__init__()
        self.gen = {}  # tab -> {generation setting: its component}, for the Record size estimate
        register = getattr(self, "on_after_component", None)  # A1111 ≥ 1.7, Forge, Neo
        for tab in ("txt2img", "img2img") if register else ():
            for field, suffix in estimate.GEN_FIELDS.items():
                if tab == "txt2img" or not field.startswith(("hr_", "enable_hr")):
                    register(
                        lambda c, t=tab, f=field: self.gen.setdefault(t, {}).__setitem__(f, c.component),
                        elem_id=f"{tab}_{suffix}",
                    )

    def ui(self, is_img2img):
        eid = self.elem_ids(is_img2img)
        p = SPEC.by_name
        with InputAccordion(False, label=SPEC.title, elem_id=eid("enabled")) as enabled:
            self.host_notice()
            gr.Markdown(
                "Record the self-attention of a generation into a named reference (**Record**), then blend it into "
                "later generations (**Use**): coefficient > 0 keeps the reference's look, < 0 pushes away from it."
            )
            comps = {}
            tools = {}

            def reference(param, elem_id):
                return gr.Dropdown(
                    label=param.label, choices=forge_library.all_names(), value=param.default, allow_custom_value=True,
                    elem_id=elem_id,
                )  # fmt: skip

            def buttons():
                for name, symbol in (("refresh", "refresh"), ("delete", "clear_prompt"), ("record", "record")):
                    tools[name] = panel.tool_button(symbol, eid(name), SPEC.controls[name])

            rows = [
                ("mode",), ("reference", buttons), ("coefficient",), ("save",), ("storage",), ("image",),
                ("more_references",), ("layers",), ("start", "end"), ("hires",), ("uncond",), ("batch_item",),
                ("record_every",), ("rate",), ("prompt_lines",), ("batch_sets",),
            ]  # fmt: skip
            image_on_demand = {"visible": p["mode"].default == "Image"}  # shown in mode Image only
            batch_on_demand = {"visible": p["mode"].default == forge_consistent.MODE}  # shown in mode Batch only
            custom = {
                "reference": reference,
                "image": lambda param, elem_id: self.image_input(is_img2img, param, elem_id, **image_on_demand),
                "rate": lambda param, elem_id: panel.component(param, elem_id, **batch_on_demand),
                "prompt_lines": lambda param, elem_id: gr.Textbox(
                    label=param.label,
                    value=param.default,
                    lines=3,
                    info=param.info,
                    elem_id=elem_id,
                    **batch_on_demand,
                ),
                "batch_sets": lambda param, elem_id: panel.component(param, elem_id, **batch_on_demand),
            }
            panel.layout(SPEC, comps, rows, eid, custom)
            with gr.Row(equal_height=False):
                size_line = gr.Markdown("Record size: press 📏 for an estimate", elem_id=eid("record_size"))
                tools["estimate"] = panel.tool_button("estimate", eid("estimate"), SPEC.controls["estimate"])
            library = gr.Markdown(_library_text(), elem_id=eid("library"))
            with gr.Accordion("Library: thumbnails, rename", open=False, elem_id=eid("library_more")):
                gallery = gr.Gallery(
                    _thumbnails(), label="Recorded images", columns=6, height=180, interactive=False,
                    elem_id=eid("thumbnails"),
                )  # fmt: skip
                with gr.Row(equal_height=False):
                    new_name = gr.Textbox(label="Rename the selected reference to", lines=1, elem_id=eid("new_name"))
                    rename_button = gr.Button("Rename", elem_id=eid("rename"), size="sm")

        def refresh_fn(current):
            return gr.update(choices=forge_library.all_names(), value=current), _library_text(), _thumbnails()

        def rename_fn(current, new):
            try:
                done = forge_library.rename(current or "", new or "")
            except ImgcondError as e:
                return gr.update(), f"⚠️ {e}", gr.update()
            return gr.update(choices=forge_library.all_names(), value=done["name"]), _library_text(), _thumbnails()

        gen = self.gen.get("img2img" if is_img2img else "txt2img", {})
        gen_names = list(gen)
        est_names = ["mode", "layers", "hires", "uncond", "record_every"]

        def estimate_fn(*args):
            settings = dict(zip(gen_names, args[: len(gen_names)], strict=True))
            values = {**SPEC.defaults(), **dict(zip(est_names, args[len(gen_names) :], strict=True))}
            return estimate.record_size_line(getattr(shared, "sd_model", None), settings, values, _precision())

        def delete_fn(current):
            try:
                found = forge_library.delete(forge_library.check_name(current or ""))
            except ImgcondError as e:
                return gr.update(), f"⚠️ {e}"
            text = _library_text() + ("" if found else f"\n\n'{current}' was not found.")
            return gr.update(choices=forge_library.all_names()), text

        tools["refresh"].click(
            refresh_fn, inputs=[comps["reference"]], outputs=[comps["reference"], library, gallery]
        )  # fmt: skip
        rename_button.click(
            rename_fn, inputs=[comps["reference"], new_name], outputs=[comps["reference"], library, gallery]
        )  # fmt: skip
        tools["estimate"].click(
            estimate_fn, inputs=[*gen.values(), *(comps[n] for n in est_names)], outputs=[size_line],
            show_progress=panel.NO_PROGRESS,
        )  # fmt: skip
        tools["delete"].click(delete_fn, inputs=[comps["reference"]], outputs=[comps["reference"], library])
        batch_comps = [comps["rate"], comps["prompt_lines"], comps["batch_sets"]]
        image_row = comps["image"].imgcond_row  # the image with its gallery button

        def mode_fn(mode):
            batch = gr.update(visible=mode == forge_consistent.MODE)
            return gr.update(visible=mode == "Image"), *([batch] * len(batch_comps))

        comps["mode"].change(
            mode_fn, inputs=[comps["mode"]], outputs=[image_row, *batch_comps], show_progress=panel.NO_PROGRESS
        )
        # 📌: the selected result becomes the reference of mode Image (kept under the name by the next generation)
        self.gallery_links.add(
            images.tab_of(is_img2img), tools["record"], [comps["mode"], comps["image"]], lambda image: ("Image", image)
        )
        return self.finish_ui(enabled, comps)

    def process(self, p, *args):
        values = self.parse_args(p, args)
        if not values["enabled"]:
            return
        try:
            budget = int(float(_opt("imgcond_refdrop_ram_budget_gb", 16.0)) * 2**30)
            share = float(_opt("imgcond_refdrop_gpu_share", 25.0)) / 100
            job = host.plan(p, values, budget, _precision(), gpu_share=share)
            if values["mode"] == "Image":
                with progress.status("RefDrop: preparing the reference from the image"):
                    job.image_latent = host.encode_image(p, values["image"].image)
        except ImgcondError as e:
            script.stop(p, e)
            return
        forge.job_state(p, "refdrop", lambda: {"job": job, "trackers": {}})

    def process_before_every_sampling(self, p, *args, **kwargs):
        state = getattr(p, "_imgcond_state", {}).get("refdrop")
        if not state:
            return
        job = state["job"]
        pass_name = forge.pass_name(p)
        if getattr(p, "iteration", 0) > 0 and job.values["mode"] == "Record":
            return  # record the first image of the job only
        if pass_name == "hires" and not job.values["hires"]:
            return
        steps = int(getattr(p, "hr_second_pass_steps", 0) or p.steps) if pass_name == "hires" else int(p.steps)
        job.iteration = int(getattr(p, "iteration", 0) or 0)
        job.batch_seed = int((getattr(p, "seeds", None) or [getattr(p, "seed", 0) or 0])[0])
        tracker = forge_patch.PassTracker(pass_name, steps)
        state["trackers"][pass_name] = tracker  # a repeated hires call replaces the discarded one
        forge_install.capture_schedule(p, tracker)
        attn = forge.attention_kernel()
        forge.patch_unet(p, lambda unet: forge_install.install(unet, job, tracker, attn))
        skip = host.infotext_skip(job.values, int(getattr(p, "n_iter", 1) or 1))
        skip += () if job.record_every > 1 else ("record_every",)  # only a Record keeps a subset
        skip += () if job.values["mode"] == "Record" else ("storage",)  # a Record choice: Use reads the file's kind
        if job.trajectory is not None:
            skip += ("layers", "record_every")  # a trajectory serves every layer: the selection is made at Use
        p.extra_generation_params.update(SPEC.infotext(job.values, skip))  # written once the patch is installed

    def postprocess(self, p, processed, *args):
        state = getattr(p, "_imgcond_state", {}).pop("refdrop", None)
        if not state:
            return
        try:
            job = state["job"]
            if (job.record is not None or job.trajectory is not None) and state["trackers"]:
                with progress.status(f"RefDrop: keeping the reference '{state['job'].values['reference']}'"):
                    job = state["job"]
                    if job.values["mode"] == "Image":  # the reference is the uploaded image
                        thumb = forge_library.make_thumbnail(job.values["image"].image)
                    else:
                        thumb = _thumbnail_of(processed, job.values["batch_item"])
                    host.finish_record(job, state["trackers"], job.values["save"], forge.interrupted(), thumb)
        except ImgcondError as e:
            logger.error("%s", e)
            forge.notify(processed, str(e))
        finally:
            host.release(state["job"])


def _thumbnail_of(processed, item: int) -> str:
    """The recorded image of a Record job (its batch item of the first image set), as a small JPEG data URI."""
    images = list(getattr(processed, "images", None) or [])
    index = int(getattr(processed, "index_of_first_image", 0) or 0) + int(item)
    if not 0 <= index < len(images) or not hasattr(images[index], "convert"):
        return ""
    return forge_library.make_thumbnail(images[index])


def _thumbnails() -> list:
    """(image, name) of every listed reference that has a thumbnail, for the library's gallery."""
    try:
        rows = forge_library.describe()
    except ImgcondError:
        return []
    pairs = [(forge_library.thumbnail_image(r.get("thumbnail") or ""), r["name"]) for r in rows]
    return [(img, name) for img, name in pairs if img is not None]


def _library_text() -> str:
    try:
        rows = forge_library.describe()
    except ImgcondError as e:
        return f"⚠️ {e}"
    if not rows:
        return "No references yet."
    lines = [
        "| reference | model | storage | size | steps | image | stored | where |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("broken"):
            lines.append(f"| {r['name']} | ⚠️ unreadable: {r['broken']} | | | | | file |")
            continue
        steps = ", ".join(f"{k}: {v}" for k, v in (r.get("steps") or {}).items() if not k.endswith("_uncond"))
        kind = "trajectory" if r.get("storage") == "trajectory" else "K/V"
        stored = (r["precision"] or "") + (f", every {r['record_every']}" if (r["record_every"] or 1) > 1 else "")
        cells = (r["name"], r["family"], kind, r["size"], steps, r["resolution"], stored, r["kept"])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def on_ui_settings():
    section = ("imgcond", "ImgCond")
    shared.opts.add_option(
        "imgcond_refdrop_ram_budget_gb",
        shared.OptionInfo(
            16.0,
            "RefDrop: RAM budget per recorded reference (GiB, 0 = unlimited)",
            gr.Number,
            {"minimum": 0},
            section=section,
        ),
    )
    shared.opts.add_option(
        "imgcond_refdrop_gpu_share",
        shared.OptionInfo(
            25.0,
            "RefDrop: keep recordings in GPU memory, all of them together within this share of it (%, 0 = always "
            "in RAM); a recording that does not fit, or would leave less than a quarter of it free, goes to RAM",
            gr.Slider,
            {"minimum": 0, "maximum": 75, "step": 5},
            section=section,
        ),
    )
    shared.opts.add_option(
        "imgcond_refdrop_storage_precision",
        shared.OptionInfo(
            host.precision_from_settings(_settings()),  # an older 'store fp16: true' becomes "fp16"
            "RefDrop: storage precision of recorded K/V (fp16 halves the memory of fp32 K/V, fp8 quarters it with one "
            "scale per tensor; Use is then not bit-exact)",
            gr.Radio,
            {"choices": list(host.PRECISIONS)},
            section=section,
        ),
    )


def add_routes(_demo, app):
    @app.get("/imgcond/v1/refdrop/references")
    @forge.http_route
    def references():
        return forge_library.describe()

    @app.delete("/imgcond/v1/refdrop/references/{name}")
    @forge.http_route
    def delete_reference(name: str):
        return {"deleted": forge_library.delete(forge_library.check_name(name))}

    @app.post("/imgcond/v1/refdrop/references/{name}/rename")
    @forge.http_route
    def rename_reference(name: str, body: dict):
        new = body.get("name") if isinstance(body, dict) else None
        if not isinstance(new, str):
            raise ArgumentError("name", new, 'a JSON body {"name": "<new name>"}')
        return forge_library.rename(name, new)


on_settings(on_ui_settings)
xyz.hook(SPEC, "RefDrop", {"reference": forge_library.all_names})
script_callbacks.on_app_started(add_routes)
