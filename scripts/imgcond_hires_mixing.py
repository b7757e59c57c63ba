"""Hires iterative mixing accordion (txt2img only): thin glue between the WebUI and lib_imgcond (no maths here)."""

from __future__ import annotations

import gradio as gr
from modules import scripts
from modules.ui_components import InputAccordion

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host import forge
from lib_imgcond.mixing import forge_mixing as host
from lib_imgcond.mixing.schedules import MixParams, schedule_svg, zprime_weights
from lib_imgcond.mixing.spec import SPEC
from lib_imgcond.spec import registry
from lib_imgcond.webui import panel, script, xyz

registry.register(SPEC)

PLOT_STEPS = 20  # the plot's assumed number of hires steps; fractions scale with the real count
_CURVE = ("schedule", "alpha", "start", "stop", "clamp", "blend_min", "blend_max")


def plot_html(*values) -> str:
    try:
        params = MixParams(**dict(zip(_CURVE, values, strict=True))).validate()
        svg = schedule_svg(zprime_weights(params, PLOT_STEPS), width=360, height=130)
    except (ValueError, TypeError) as e:  # ImgcondError is a ValueError
        return f"<p>⚠️ {e}</p>"
    return f'<div title="z′ weight per hires step, assuming {PLOT_STEPS} hires steps">{svg}</div>'


class HiresMixingScript(script.TechniqueScript, scripts.Script):
    spec = SPEC
    txt2img_only = True
    sorting_priority = 22

    def ui(self, is_img2img):
        eid = self.elem_ids(is_img2img)
        p = SPEC.by_name
        with InputAccordion(False, label=SPEC.title, elem_id=eid("enabled")) as enabled:
            self.host_notice()
            gr.Markdown(
                "Acts on the **hires-fix pass only** (does nothing when Hires. fix is off): before every hires step "
                "the sampler's latent is mixed with the upscaled first-pass latent noised to that step's level "
                "(after every step's update with the iterative_mixer order), with the weight plotted below "
                "(DemoFusion skip residual / Iterative Mixing)."
            )
            comps = {}
            rows = [
                ("schedule",), ("alpha",), ("blend_max",), ("order",),
                ("start", "stop"), ("clamp", "blend_min"), ("blend",), ("normalize",), ("fresh_noise",), ("rewind",),
                ("rewind_min", "rewind_max"),
            ]  # fmt: skip
            panel.layout(SPEC, comps, rows, eid)
            plot = gr.HTML(plot_html(*(p[n].default for n in _CURVE)), elem_id=eid("plot"))
            gr.Markdown(f"z′ weight per hires step (plotted for {PLOT_STEPS} steps; the fractions scale with yours).")
        inputs = [comps[n] for n in _CURVE]
        for name in _CURVE:
            comps[name].change(plot_html, inputs=inputs, outputs=[plot], show_progress=panel.NO_PROGRESS)
        return self.finish_ui(enabled, comps)

    def process(self, p, *args):
        values = self.parse_args(p, args)
        if not values["enabled"]:
            return
        try:
            params = host.mix_params(values)
            host.check_model(p)
        except ImgcondError as e:
            script.stop(p, e)
            return
        if not getattr(p, "enable_hr", False):
            forge.warn(
                p, "Hires iterative mixing acts on the hires-fix pass only; Hires. fix is off, so it did nothing"
            )
            return
        forge.job_state(p, "hrmix", lambda: {"values": values, "params": params})

    def process_before_every_sampling(self, p, *args, **kwargs):
        state = getattr(p, "_imgcond_state", {}).get("hrmix")
        if not state or not getattr(p, "is_hr_pass", False):
            return
        if host.install(p, state["params"], kwargs.get("x"), host.pass_noise(p, kwargs)):
            p.extra_generation_params.update(SPEC.infotext(state["values"]))

    def postprocess(self, p, processed, *args):
        forge.drop_job_state(p, "hrmix")


xyz.hook(SPEC, "Hires mixing")
