"""Hires iterative mixing's parameters (UI order = positional API order; new parameters are appended at the end)."""

from __future__ import annotations

from lib_imgcond.core.mixing import BLENDS, ORDERS, SCHEDULES
from lib_imgcond.ui.spec import Param, Spec

SPEC = Spec(
    "hrmix",
    "Hires iterative mixing",
    [
        Param(
            "schedule",
            "Schedule",
            "choice",
            "demofusion_cosine",
            choices=SCHEDULES,
            xyz=True,
            info="curve of the weight on the noised upscaled latent z′ over the hires steps",
        ),
        Param(
            "alpha",
            "α (curve exponent)",
            "float",
            3.0,
            0.05,
            100.0,
            0.05,
            xyz=True,
            info="DemoFusion cosine_scale_1; larger = mixing fades out sooner",
        ),
        Param("start", "Start at", "float", 0.0, 0.0, 1.0, 0.01, info="fraction of the hires steps; no mixing before"),
        Param("stop", "Stop at", "float", 1.0, 0.0, 2.0, 0.01, info="curve end; > 1 stretches it past the last step"),
        Param("clamp", "Clamp at", "float", 1.0, 0.0, 1.0, 0.01, info="no mixing from this fraction of the steps on"),
        Param("blend_min", "Blend min", "float", 0.0, 0.0, 1.0, 0.01, info="z′ weight where the curve is 0"),
        Param("blend_max", "Blend max", "float", 1.0, 0.0, 1.0, 0.01, xyz=True, info="z′ weight where the curve is 1"),
        Param("blend", "Blend function", "choice", "addition", choices=BLENDS),
        Param("normalize", "Normalise", "bool", False, info="match the mixed latent's per-channel mean/std to z′"),
        Param("fresh_noise", "Fresh noise per step", "bool", False, info="a new ε every step, not the pass's"),
        Param(
            "order",
            "Mixing order",
            "choice",
            "demofusion",
            choices=ORDERS,
            xyz=True,
            info="demofusion: mix before each step, at its noise level; iterative_mixer: mix after each step's update",
        ),
        Param("rewind", "Rewind", "bool", False, info="then re-noise the result and sample again from later steps"),
        Param(
            "rewind_min",
            "Rewind min",
            "float",
            0.5,
            0.01,
            0.99,
            0.01,
            info="each rewind starts this fraction of the remaining steps later (0.5: 50 %, 75 %, …)",
        ),
        Param("rewind_max", "Rewind max", "float", 0.8, 0.01, 1.0, 0.01, info="no rewind starts after this fraction"),
    ],
)
