"""Errors shown to WebUI users. Every message says what was wrong and what to do."""

from __future__ import annotations


class ImgcondError(ValueError):
    """A user-facing error: bad input, missing file, unsupported model. Raised before sampling."""


class ArgumentError(ImgcondError):
    """An argument has the wrong type or lies outside its allowed range."""

    def __init__(self, name: str, value: object, allowed: str):
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"{name}={value!r} is not allowed: expected {allowed}")
