"""RefDrop accordion: thin glue between the WebUI and lib_imgcond (no maths here)."""

from __future__ import annotations

import gradio as gr
from modules import script_callbacks, scripts, shared
from modules.ui_components import InputAccordion

from lib_imgcond.core.errors import ImgcondError
from lib_imgcond.hosts import forge, progress
from lib_imgcond.hosts import forge_refdrop as host
from lib_imgcond.log import logger
from lib_imgcond.ui import panel, registry, script, xyz
from lib_imgcond.ui.refdrop_spec import SPEC

registry.register(SPEC)


def _opt(name: str, default):
    return getattr(shared.opts, name, default) if hasattr(shared, "opts") else default


class RefDropScript(script.TechniqueScript, scripts.Script):
    spec = SPEC
    sorting_priority = 20

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
                    label=param.label, choices=host.all_names(), value=param.default, allow_custom_value=True,
                    elem_id=elem_id,
                )  # fmt: skip

            def buttons():
                tools["refresh"] = panel.tool_button("refresh", eid("refresh"), "Refresh the list of references")
                tools["delete"] = panel.tool_button("clear_prompt", eid("delete"), "Delete this reference")

            rows = [
                ("mode",), ("reference", buttons), ("coefficient",), ("save",), ("storage",), ("image",),
                ("more_references",), ("layers",), ("start", "end"), ("hires",), ("uncond",), ("batch_item",),
            ]  # fmt: skip
            image_on_demand = {"visible": p["mode"].default == "Image"}  # shown in mode Image only
            custom = {
                "reference": reference,
                "image": lambda param, elem_id: panel.component(param, elem_id, **image_on_demand),
            }
            panel.layout(SPEC, comps, rows, eid, custom)
            library = gr.Markdown(_library_text(), elem_id=eid("library"))

        def refresh_fn(current):
            return gr.update(choices=host.all_names(), value=current), _library_text()

        def delete_fn(current):
            try:
                found = host.delete(host.check_name(current or ""))
            except ImgcondError as e:
                return gr.update(), f"⚠️ {e}"
            text = _library_text() + ("" if found else f"\n\n'{current}' was not found.")
            return gr.update(choices=host.all_names()), text

        tools["refresh"].click(refresh_fn, inputs=[comps["reference"]], outputs=[comps["reference"], library])
        tools["delete"].click(delete_fn, inputs=[comps["reference"]], outputs=[comps["reference"], library])
        comps["mode"].change(
            lambda mode: gr.update(visible=mode == "Image"), inputs=[comps["mode"]], outputs=[comps["image"]],
            show_progress=panel.NO_PROGRESS,
        )  # fmt: skip
        return self.finish_ui(enabled, comps)

    def process(self, p, *args):
        values = self.parse_args(p, args)
        if not values["enabled"]:
            return
        try:
            budget = int(float(_opt("imgcond_refdrop_ram_budget_gb", 16.0)) * 2**30)
            job = host.plan(p, values, budget, bool(_opt("imgcond_refdrop_store_fp16", False)))
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
        tracker = host.PassTracker(pass_name, steps)
        state["trackers"][pass_name] = tracker  # a repeated hires call replaces the discarded one
        host.capture_schedule(p, tracker)
        attn = forge.attention_kernel()
        forge.patch_unet(p, lambda unet: host.install(unet, job, tracker, attn))
        skip = () if job.values["mode"] == "Record" else ("storage",)  # a Record choice: Use reads the file's kind
        if job.trajectory is not None:
            skip = ("layers",)  # a trajectory serves every layer: the selection is made at Use
        p.extra_generation_params.update(SPEC.infotext(job.values, skip))  # written once the patch is installed

    def postprocess(self, p, processed, *args):
        state = getattr(p, "_imgcond_state", {}).pop("refdrop", None)
        if not state:
            return
        try:
            job = state["job"]
            if (job.record is not None or job.trajectory is not None) and state["trackers"]:
                with progress.status(f"RefDrop: keeping the reference '{state['job'].values['reference']}'"):
                    host.finish_record(
                        state["job"], state["trackers"], state["job"].values["save"], forge.interrupted()
                    )
        except ImgcondError as e:
            logger.error("%s", e)
            forge.notify(processed, str(e))
        finally:
            host.release(state["job"])


def _library_text() -> str:
    try:
        rows = host.describe()
    except ImgcondError as e:
        return f"⚠️ {e}"
    if not rows:
        return "No references yet."
    lines = ["| reference | model | storage | size | steps | image | where |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("broken"):
            lines.append(f"| {r['name']} | ⚠️ unreadable: {r['broken']} | | | | | file |")
            continue
        where = " + ".join(w for w, on in (("RAM", r["in_ram"]), ("file", r["saved"])) if on)
        steps = ", ".join(f"{k}: {v}" for k, v in (r.get("steps") or {}).items() if not k.endswith("_uncond"))
        kind = "trajectory" if r.get("storage") == "trajectory" else "K/V"
        lines.append(
            f"| {r['name']} | {r['family']} | {kind} | {r['size']} | {steps} | {r['width']}×{r['height']} | {where} |"
        )
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
        "imgcond_refdrop_store_fp16",
        shared.OptionInfo(
            False, "RefDrop: store fp32 K/V as fp16 (halves memory; Use is then not bit-exact)", section=section
        ),
    )


def add_routes(_demo, app):
    @app.get("/imgcond/v1/refdrop/references")
    @forge.http_route
    def references():
        return host.describe()

    @app.delete("/imgcond/v1/refdrop/references/{name}")
    @forge.http_route
    def delete_reference(name: str):
        return {"deleted": host.delete(host.check_name(name))}


script_callbacks.on_ui_settings(on_ui_settings)
xyz.hook(SPEC, "RefDrop", {"reference": host.all_names})
script_callbacks.on_app_started(add_routes)
