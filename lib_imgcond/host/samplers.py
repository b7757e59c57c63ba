"""What the host says about its samplers: how many model evaluations a pass of `steps` steps takes.

Forge (like A1111) keeps one `SamplerData(name, constructor, aliases, options)` per sampler in
`modules.sd_samplers`; `options["second_order"]` marks the samplers that evaluate the model twice per step, and
`SamplerData.total_steps(steps)` is the count Forge itself uses for its progress (`p.step_multiplier`). We read that
instead of guessing from the name: "DPM++ 2M SDE", "DPM++ 2M SDE Heun" and "DPM++ 3M SDE" evaluate once per step even
though their names contain "SDE", "Heun" or "3M". Where the host has no configuration for a sampler (an unknown name,
no WebUI), one evaluation per step is assumed; a recording still counts its real evaluations as it goes.
"""

from __future__ import annotations

from typing import Any

SAME = ("", "Use same sampler")  # hires sampler values meaning "the first pass's sampler"


def sampler_config(name: str | None, sampler: Any = None) -> Any | None:
    """The host's SamplerData for a sampler: `sampler.config` when the sampler object exists, else the entry of
    `modules.sd_samplers` for `name` (a label, or an alias; Forge has made `p.sampler_name` a valid label before
    scripts run); None when the host has none."""
    config = getattr(sampler, "config", None) if sampler is not None else None
    if config is not None:
        return config
    if not name:
        return None
    try:
        from modules import sd_samplers
    except ImportError:  # no WebUI
        return None
    table = getattr(sd_samplers, "all_samplers_map", None) or {}
    config = table.get(name)
    if config is None:
        label = (getattr(sd_samplers, "samplers_map", None) or {}).get(name.lower())  # aliases, lower-case labels
        config = table.get(label) if label else None
    return config


def evaluations(name: str | None, steps: int, sampler: Any = None) -> int:
    """Model evaluations of a pass of `steps` steps as the host counts them (`SamplerData.total_steps`), or `steps`
    when the host has no configuration for the sampler."""
    steps = int(steps)
    config = sampler_config(name, sampler)
    total = getattr(config, "total_steps", None)
    if callable(total):
        try:
            return int(total(steps))
        except Exception:  # a third-party SamplerData that misbehaves: read the option the stock one reads
            pass
    options = getattr(config, "options", None) or {}
    return steps * 2 if options.get("second_order", False) else steps


def pass_sampler_name(p: Any, hires: bool) -> str:
    """The sampler name a pass of `p` will use (the hires pass falls back to the first pass's sampler)."""
    first = str(getattr(p, "sampler_name", "") or "")
    if not hires:
        return first
    name = str(getattr(p, "hr_sampler_name", "") or "")
    return first if name in SAME else name
