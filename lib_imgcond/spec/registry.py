"""The techniques this extension offers, for the /imgcond/v1/techniques route and the docs' tables."""

from __future__ import annotations

from typing import Any

from lib_imgcond.spec.params import Spec

_SPECS: dict[str, Spec] = {}


def register(spec: Spec) -> Spec:
    _SPECS[spec.prefix] = spec
    return spec


def describe() -> dict[str, Any]:
    out = {}
    for prefix, spec in _SPECS.items():
        out[prefix] = {
            "title": spec.title,
            "alwayson_key": spec.title.lower(),
            "args": [{"name": "enabled", "kind": "bool", "default": False}]
            + [
                {
                    "name": p.name,
                    "label": p.label,
                    "kind": p.kind,
                    "default": p.default,
                    "minimum": p.minimum,
                    "maximum": p.maximum,
                    "choices": list(p.choices) or None,
                    "infotext_key": spec.key(p.name) if p.infotext else None,
                }
                for p in spec.params
            ],
        }
    return out
