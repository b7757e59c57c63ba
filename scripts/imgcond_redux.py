"""Redux control accordion: thin glue between the WebUI and lib_imgcond (no maths here)."""

from __future__ import annotations

from collections.abc import Mapping

import gradio as gr
from modules import scripts, shared
from modules.ui_components import InputAccordion

from lib_imgcond.common.errors import ImgcondError
from lib_imgcond.host import forge, progress
from lib_imgcond.redux import forge_files
from lib_imgcond.redux import forge_redux as host
from lib_imgcond.redux.spec import SLOTS, SPEC, automerge_paster, expand_images
from lib_imgcond.spec import registry
from lib_imgcond.vision import forge_encoders as encoders
from lib_imgcond.webui import images, panel, script, xyz
from lib_imgcond.webui.settings import on_settings

registry.register(SPEC)
STATE_KEY = "redux"


def _files(kind: str) -> list[str]:
    try:
        return ["", *forge_files.list_files(kind)]
    except OSError:
        return [""]


def _encoder_geometry(siglip_name: str) -> tuple[int, int]:
    """(input size, patch) of the chosen SigLIP file, for the token count; 384/14 when it cannot be read."""
    try:
        cfg = forge_files.vision_config(forge_files.resolve("siglip", siglip_name or ""))
        return cfg.image_size, cfg.patch
    except Exception:  # no file yet, wrong file: the count still helps
        return 384, 14


def _ui_values(names: list[str], args) -> dict:
    return SPEC.parse([{"enabled": True, **dict(zip(names, args, strict=True))}])


class ReduxScript(script.TechniqueScript, scripts.Script):
    spec = SPEC
    sorting_priority = 21

    def ui(self, is_img2img):
        eid = self.elem_ids(is_img2img)
        comps: dict = {}
        previews = []
        with InputAccordion(False, label=SPEC.title, elem_id=eid("enabled")) as enabled:
            self.host_notice()
            gr.Markdown(
                "Flux Redux: reference images become extra conditioning tokens after the prompt (Flux only). "
                "Models: `models/imgcond/siglip/`, `models/clip_vision/` or `models/ControlNetPreprocessor/` "
                "(sigclip_vision_patch14_384.safetensors) and `models/imgcond/redux/` (flux1-redux-dev.safetensors)."
            )
            tools = {}

            def model(param, elem_id):
                kind = "siglip" if param.name == "siglip" else "redux"
                return gr.Dropdown(
                    label=param.label, choices=_files(kind), value="", allow_custom_value=True, elem_id=elem_id,
                    info=param.info,
                )  # fmt: skip

            def refresh():
                tools["refresh"] = panel.tool_button("refresh", eid("refresh"), SPEC.controls["refresh"])

            custom = {"siglip": model, "redux_model": model}
            scratch = images.scratch(eid("paint_data"))
            for k in range(1, SLOTS + 1):
                custom[f"image{k}"] = lambda param, elem_id: self.image_input(is_img2img, param, elem_id)
                custom[f"mask{k}"] = lambda param, elem_id, k=k: self.mask_input(
                    is_img2img, param, elem_id, k, comps[f"image{k}"], scratch
                )
                custom[f"interpolation{k}"] = lambda param, elem_id: panel.component(
                    param, elem_id, info="advanced only"
                )

            def slot(k: int):
                rows = [
                    (f"use{k}",), (f"image{k}", f"mask{k}"), (f"weight{k}", f"strength{k}"),
                    (f"mode{k}", f"margin{k}"), (f"control{k}",), (f"factor{k}", f"interpolation{k}"),
                    (f"strength_type{k}",), (f"automerge{k}",), (f"merge_threshold{k}",),
                ]  # fmt: skip
                panel.layout(SPEC, comps, rows, eid, custom, advanced_id=f"advanced{k}")
                button = gr.Button("Preview prepared image and mask", elem_id=eid(f"preview{k}"), size="sm")
                with gr.Row():
                    shown = (
                        gr.Image(label="Prepared image", interactive=False, elem_id=eid(f"prepared{k}")),
                        gr.Image(label="Prepared mask", interactive=False, elem_id=eid(f"prepared_mask{k}")),
                    )
                previews.append((k, button, shown))
                if k < SLOTS:  # the next slot appears on demand
                    panel.on_demand(f"Add image {k + 1}", eid(f"add_image{k + 1}"), lambda: slot(k + 1))

            panel.build_rows(SPEC, comps, [("siglip", "redux_model", refresh)], eid, custom)
            with gr.Group(elem_id=eid("slot1")):
                slot(1)
            panel.layout(SPEC, comps, [("start", "end")], eid, advanced_id="advanced")
            count = gr.Markdown("No reference image yet: 0 tokens.", elem_id=eid("count"))

        names = [x.name for x in SPEC.params]
        inputs = [comps[n] for n in names]

        def count_fn(*args):
            try:
                values = _ui_values(names, args)
            except ImgcondError as e:
                return f"⚠️ {e}"
            size, patch = _encoder_geometry(values["siglip"])
            return host.describe_counts(values, size, patch, host.token_source(values))[0]

        def preview_fn(k, *args):
            try:
                values = _ui_values(names, args)
            except ImgcondError as e:
                return None, None, f"⚠️ {e}"
            size, patch = _encoder_geometry(values["siglip"])
            try:  # a preview encodes the images that merge tokens, so their exact count can be shown
                text, prepared = host.describe_counts(values, size, patch, host.token_source(values, compute=True))
            except Exception as e:  # loading or running the encoder: show it, never break the UI
                return None, None, f"⚠️ Redux: {type(e).__name__}: {e}"
            for image, mask, slot in prepared:
                if slot == k:
                    return image, mask, text
            return None, None, text

        watched = [n for n in names if not n.startswith(("weight", "strength", "margin", "start", "end"))]
        for n in watched:
            comps[n].change(count_fn, inputs=inputs, outputs=[count], show_progress=panel.NO_PROGRESS)
        for k, button, shown in previews:
            button.click(lambda *a, k=k: preview_fn(k, *a), inputs=inputs, outputs=[*shown, count])

        def refresh_fn(siglip, redux):
            return gr.update(choices=_files("siglip"), value=siglip), gr.update(choices=_files("redux"), value=redux)

        tools["refresh"].click(
            refresh_fn, inputs=[comps["siglip"], comps["redux_model"]], outputs=[comps["siglip"], comps["redux_model"]]
        )
        result = self.finish_ui(enabled, comps)
        merge = {id(comps[f"automerge{k}"]): automerge_paster(k) for k in range(1, SLOTS + 1)}
        self.infotext_fields = [(c, merge.get(id(c), fn)) for c, fn in self.infotext_fields]
        return result

    def process(self, p, *args):
        values = self.parse_args(p, args)
        if not values["enabled"]:
            return
        try:
            with progress.status("Redux: loading the models and encoding the reference images"):
                job = host.plan(p, values)
        except Exception as e:  # every failure stops the job before sampling, with a message
            error = e if isinstance(e, ImgcondError) else ImgcondError(f"Redux: {type(e).__name__}: {e}")
            script.stop(p, error)
            return
        forge.drop_job_state(p, STATE_KEY)
        forge.job_state(p, STATE_KEY, lambda: job)

    def process_before_every_sampling(self, p, *args, **kwargs):
        job = getattr(p, "_imgcond_state", {}).get(STATE_KEY)
        if job is None:
            return
        forge.patch_unet(p, lambda unet: host.install(unet, job))
        shown = {**job.values, "siglip": job.siglip, "redux_model": job.redux}  # once the patch is really installed
        p.extra_generation_params.update(SPEC.infotext(shown, skip=host.infotext_skip(job.values)))
        p.extra_generation_params["Redux tokens"] = job.count

    def postprocess(self, p, processed, *args):
        forge.drop_job_state(p, STATE_KEY)
        encoders.end_job(p)

    def prepare_args(self, args):
        if args and isinstance(args[0], Mapping):
            return (expand_images(dict(args[0])), *args[1:])
        return args


def on_ui_settings():
    section = ("imgcond", "ImgCond")
    shared.opts.add_option(
        forge_files.EXTRA_DIRS_OPTION,
        shared.OptionInfo(
            "",
            "Redux: extra model folders (';'-separated; each folder or its siglip/ and redux/ subfolders is searched)",
            section=section,
        ),
    )


on_settings(on_ui_settings)
xyz.hook(SPEC, "Redux")
