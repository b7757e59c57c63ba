"""unCLIP accordion (SD2.1-unclip checkpoints): thin glue between the WebUI and lib_imgcond (no maths here)."""

from __future__ import annotations

import gradio as gr
from modules import scripts
from modules.ui_components import InputAccordion

from lib_imgcond.flexdiffuse import forge_encoders
from lib_imgcond.host import forge
from lib_imgcond.spec import registry
from lib_imgcond.unclip import forge_unclip as host
from lib_imgcond.unclip.spec import AUTO, SLOTS, SPEC
from lib_imgcond.webui import panel, script, xyz

registry.register(SPEC)

STATE_KEY = "unclip"


def _encoders() -> list[str]:
    return panel.file_choices(AUTO, forge_encoders.configured_encoders, "CLIP vision encoders")


class UnclipScript(script.TechniqueScript, scripts.Script):
    spec = SPEC
    sorting_priority = 21

    def ui(self, is_img2img):
        eid = self.elem_ids(is_img2img)
        p = SPEC.by_name
        comps: dict = {}
        with InputAccordion(False, label=SPEC.title, elem_id=eid("enabled")) as enabled:
            self.host_notice()
            gr.Markdown(
                "Image conditioning of SD2.1 unCLIP checkpoints (sd21-unclip-h / -l; Forge 2.0 loads them, Forge Neo "
                "does not). Needs the matching CLIP vision encoder in `models/imgcond/clip_vision`: ViT-H/14 for -h, "
                "ViT-L/14 for -l."
            )
            with gr.Row():
                comps["encoder"] = gr.Dropdown(
                    label=p["encoder"].label, choices=_encoders(), value=AUTO, allow_custom_value=True,
                    elem_id=eid("encoder"), info=p["encoder"].info,
                )  # fmt: skip
                refresh = panel.tool_button("refresh", eid("refresh"), SPEC.controls["refresh"])
            panel.row(SPEC, comps, ("merge_noise_augmentation", "start", "end"), eid)
            with gr.Tabs():
                for k in range(1, SLOTS + 1):
                    with gr.Tab(f"Image {k}"):
                        comps[f"image{k}"] = self.image_input(is_img2img, p[f"image{k}"], eid(f"image{k}"))
                        panel.row(SPEC, comps, (f"strength{k}", f"noise_augmentation{k}"), eid)

        refresh.click(
            lambda current: gr.update(
                choices=_encoders(),
                value=current,
            ),
            inputs=[comps["encoder"]],
            outputs=[comps["encoder"]],
        )
        return self.finish_ui(enabled, comps)

    def process(self, p, *args):
        self.start_job(
            p,
            args,
            STATE_KEY,
            lambda values: host.plan(p, values, forge_encoders.extra_encoder_dir()),
            "unCLIP: loading the encoder and encoding the images",
        )

    def process_before_every_sampling(self, p, *args, **kwargs):
        job = getattr(p, "_imgcond_state", {}).get(STATE_KEY)
        if job is None:
            return
        forge.patch_unet(p, lambda unet: host.install(unet, job))
        p.extra_generation_params.update(host.infotext(job, SPEC))

    def postprocess(self, p, processed, *args):
        forge.drop_job_state(p, STATE_KEY)


xyz.hook(SPEC, SPEC.title)
