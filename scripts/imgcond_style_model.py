"""Style model (T2I-Adapter style) accordion: thin glue between the WebUI and lib_imgcond (no maths here)."""

from __future__ import annotations

import gradio as gr
from modules import script_callbacks, scripts
from modules.ui_components import InputAccordion

from lib_imgcond.flexdiffuse import forge_encoders
from lib_imgcond.host import forge
from lib_imgcond.spec import registry
from lib_imgcond.style import forge_style as host
from lib_imgcond.style.spec import AUTO, SLOTS, SPEC
from lib_imgcond.webui import images, panel, script, xyz

registry.register(SPEC)

STATE_KEY = "style_model"


def _files(lister, what: str) -> list[str]:
    return panel.file_choices(AUTO, lister, f"{SPEC.title} {what} files")


def _encoders() -> list[str]:
    return _files(forge_encoders.configured_encoders, "encoder")


class StyleModelScript(script.TechniqueScript, scripts.Script):
    spec = SPEC
    sorting_priority = 21

    def ui(self, is_img2img):
        eid = self.elem_ids(is_img2img)
        p = SPEC.by_name
        comps: dict = {}
        with InputAccordion(False, label=SPEC.title, elem_id=eid("enabled")) as enabled:
            self.host_notice()
            gr.Markdown(
                "T2I-Adapter style model (SD1.5): each image's CLIP ViT-L/14 tokens become 8 tokens appended to the "
                "prompt. Files: `models/imgcond/clip_vision/` (ViT-L/14) and `models/imgcond/style/` or "
                "`models/ControlNet/` (t2iadapter_style_sd14v1)."
            )
            with gr.Row():
                listers = {
                    "encoder": forge_encoders.configured_encoders,
                    "adapter": host.list_adapters,
                }
                for name, lister in listers.items():
                    comps[name] = gr.Dropdown(
                        label=p[name].label, choices=_files(lister, name), value=AUTO, allow_custom_value=True,
                        elem_id=eid(name), info=p[name].info,
                    )  # fmt: skip
                refresh = panel.tool_button("refresh", eid("refresh"), SPEC.controls["refresh"])
            panel.row(SPEC, comps, ("strength_type", "strength"), eid)
            panel.row(SPEC, comps, ("start", "end", "hires", "margin"), eid)
            scratch = images.scratch(eid("paint_data"))
            with gr.Tabs():
                for k in range(1, SLOTS + 1):
                    with gr.Tab(f"Image {k}"):
                        with gr.Row(equal_height=False):
                            image = self.image_input(is_img2img, p[f"image{k}"], eid(f"image{k}"))
                            mask = self.mask_input(is_img2img, p[f"mask{k}"], eid(f"mask{k}"), k, image, scratch)
                        comps[f"image{k}"], comps[f"mask{k}"] = image, mask
                        panel.row(SPEC, comps, (f"weight{k}", f"mode{k}"), eid)

        def refresh_fn(current_encoder, current_adapter):
            return (
                gr.update(
                    choices=_encoders(),
                    value=current_encoder,
                ),
                gr.update(choices=_files(host.list_adapters, "adapter"), value=current_adapter),
            )

        pair = [comps["encoder"], comps["adapter"]]
        refresh.click(refresh_fn, inputs=pair, outputs=pair)
        return self.finish_ui(enabled, comps)

    def process(self, p, *args):
        self.start_job(
            p,
            args,
            STATE_KEY,
            lambda values: host.plan(p, values, forge_encoders.extra_encoder_dir()),
            "Style model: loading the models and encoding the images",
        )

    def process_before_every_sampling(self, p, *args, **kwargs):
        job = getattr(p, "_imgcond_state", {}).get(STATE_KEY)
        if job is None or (forge.pass_name(p) == "hires" and not job.values["hires"]):
            return
        forge.patch_unet(p, lambda unet: host.install(unet, job))
        if job.count:  # weight / strength 0: nothing was applied, nothing is written
            p.extra_generation_params.update(host.infotext(job, SPEC))

    def postprocess(self, p, processed, *args):
        forge.drop_job_state(p, STATE_KEY)


def add_routes(_demo, app):
    @app.get("/imgcond/v1/style_model/files")
    def files():
        return {
            "adapter_folders": host.adapter_dirs(),
            "adapters": host.list_adapters(),
            "encoder_folders": forge_encoders.searched_dirs(forge_encoders.extra_encoder_dir()),
            "encoders": forge_encoders.configured_encoders(),
        }


xyz.hook(SPEC, SPEC.title)
script_callbacks.on_app_started(add_routes)
