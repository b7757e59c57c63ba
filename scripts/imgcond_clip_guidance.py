"""CLIP image guidance (FlexDiffuse) accordion: thin glue between the WebUI and lib_imgcond (no maths here)."""

from __future__ import annotations

import gradio as gr
from modules import script_callbacks, scripts, shared
from modules.ui_components import InputAccordion

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.common.log import logger
from lib_imgcond.flexdiffuse import forge_encoders
from lib_imgcond.flexdiffuse import forge_flexdiffuse as host
from lib_imgcond.flexdiffuse.spec import AUTO, SPEC, split_images
from lib_imgcond.host import forge, progress
from lib_imgcond.spec import registry
from lib_imgcond.vision import forge_encoders as encoders
from lib_imgcond.webui import panel, script, xyz
from lib_imgcond.webui.settings import on_settings

registry.register(SPEC)

STATE_KEY = "flexdiffuse"
EXTRA_DIR_OPTION = forge_encoders.EXTRA_DIR_OPTION


def _opt(name: str, default):
    return getattr(shared.opts, name, default) if hasattr(shared, "opts") else default


class ClipGuidanceScript(script.TechniqueScript, scripts.Script):
    spec = SPEC
    sorting_priority = 21

    def ui(self, is_img2img):
        eid = self.elem_ids(is_img2img)
        comps = {}
        with InputAccordion(False, label=SPEC.title, elem_id=eid("enabled")) as enabled:
            self.host_notice()
            gr.Markdown(
                "Pull the prompt's tokens toward the CLIP tokens of a guidance image (FlexDiffuse). Needs CLIP vision "
                "encoders (`models/imgcond/clip_vision`, `models/clip_vision` or `models/ControlNetPreprocessor`): "
                "ViT-L/14 for SD1.5; ViT-L/14 and ViT-bigG/14 for SDXL."
            )
            choices = panel.file_choices(AUTO, forge_encoders.configured_encoders, "CLIP vision encoders")
            tools = {}

            def encoder(param, elem_id):
                return gr.Dropdown(
                    label=param.label, choices=choices, value=AUTO, allow_custom_value=True, elem_id=elem_id,
                    info=param.info,
                )  # fmt: skip

            def refresh():
                tools["refresh"] = panel.tool_button("refresh", eid("refresh"), SPEC.controls["refresh"])

            def image(param, elem_id):
                return self.image_input(is_img2img, param, elem_id)

            custom = {"encoder": encoder, "encoder_g": encoder, "image": image, "image2": image}

            def second():
                panel.build_rows(SPEC, comps, [("image2",), ("weight2",)], eid, custom)

            rows = [
                ("image",), ("weight",), (lambda: panel.on_demand("Add a second image", eid("add_image2"), second),),
                ("encoder", "encoder_g", refresh), ("max_guidance",),
                ("priority", "reuse"), ("threshold_mult", "threshold_floor"), ("linear_start", "linear_end"),
                ("clustered", "header_max"), ("concept",), ("concept_threshold",), ("direct",), ("compatible",),
                ("start", "end"), ("hires",),
            ]  # fmt: skip
            panel.layout(SPEC, comps, rows, eid, custom)

        def refresh_fn(current_l, current_g):
            choices = panel.file_choices(AUTO, forge_encoders.configured_encoders, "CLIP vision encoders")
            return gr.update(choices=choices, value=current_l), gr.update(choices=choices, value=current_g)

        tools["refresh"].click(
            refresh_fn, inputs=[comps["encoder"], comps["encoder_g"]], outputs=[comps["encoder"], comps["encoder_g"]]
        )
        return self.finish_ui(enabled, comps)

    def process(self, p, *args):
        forge.drop_job_state(p, STATE_KEY)
        try:
            rest, extra = split_images(args)
        except ImgcondError as e:
            script.stop(p, e)
            return
        values = self.parse_args(p, rest)
        if not values["enabled"]:
            return
        try:
            with progress.status("CLIP image guidance: loading the encoders and encoding the images"):
                job = host.plan(p, values, extra, forge_encoders.extra_encoder_dir())
        except ImgcondError as e:
            script.stop(p, e)
            return
        forge.job_state(p, STATE_KEY, lambda: job)

    def process_before_every_sampling(self, p, *args, **kwargs):
        job = getattr(p, "_imgcond_state", {}).get(STATE_KEY)
        if job is None:
            return
        if forge.pass_name(p) == "hires" and not job.values["hires"]:
            return
        forge.patch_unet(p, lambda unet: host.install(unet, job))
        p.extra_generation_params.update(host.infotext(job, SPEC))  # once the patch is really installed

    def postprocess(self, p, processed, *args):
        job = getattr(p, "_imgcond_state", {}).get(STATE_KEY)
        if job is not None:
            logger.debug("%s: %d guided conditioning tensor(s) this job", SPEC.title, job.computed)
        forge.drop_job_state(p, STATE_KEY)
        encoders.end_job(p)


def on_ui_settings():
    section = ("imgcond", "ImgCond")
    shared.opts.add_option(
        EXTRA_DIR_OPTION,
        shared.OptionInfo(
            "",
            "CLIP image guidance: extra folder with CLIP vision encoders (searched after models/imgcond/clip_vision, "
            "before models/clip_vision and models/ControlNetPreprocessor)",
            section=section,
        ),
    )


def add_routes(_demo, app):
    @app.get("/imgcond/v1/flexdiffuse/encoders")
    @forge.http_route
    def encoders():
        return {
            "folders": forge_encoders.searched_dirs(forge_encoders.extra_encoder_dir()),
            "files": forge_encoders.configured_encoders(),
        }


on_settings(on_ui_settings)
xyz.hook(SPEC, SPEC.title)
script_callbacks.on_app_started(add_routes)
