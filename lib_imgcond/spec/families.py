"""Which model families each host loads, how each technique is tested on the families it serves, and why it refuses
the others: the one statement the README's family table, docs/compatibility.md and the run-time refusals share.

Which families a technique serves is not written here: it is the technique's own `FAMILIES` (read by
`spec/forge_families.py`, the host side). This module says, per technique, the test that covers each served family
(`Tested`) and the reason for each refused one. A served family without a test, a refused family without a reason, or
an entry for a family on the wrong side is an error (`check`), so the table cannot drift from the code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lib_imgcond.refdrop.families import DIT

ROOT = Path(__file__).resolve().parents[2]

# The families each host's loader can load (Forge 2.0's and Neo's `backend.loader.possible_models`, mapped by
# `host.forge.ENGINE_FAMILIES`; tests/e2e/test_families_loaded.py compares this with the hosts' own lists).
HOSTS: dict[str, tuple[str, ...]] = {
    "Forge 2.0": ("sd15", "sd2", "sdxl", "sdxl_refiner", "sd3", "flux", "chroma"),
    "Forge Neo": (
        "sd15", "sdxl", "sdxl_refiner", "mugen", "chroma", "flux", "flux2", "wan", "qwen_image", "krea2", "lumina2",
        "zimage", "anima", "ernie_image", "pid",
    ),
}  # fmt: skip

UNKNOWN = "its diffusion engine is none that Forge 2.0 or Forge Neo ships, so the extension cannot tell its family"


@dataclass(frozen=True)
class Tested:
    """The test that covers a technique on a family: `test` is a repository path, optionally `::function`."""

    test: str
    kind: str  # "e2e": a headless WebUI with a random checkpoint; "backend": a tiny model from the host's classes

    @property
    def path(self) -> Path:
        return ROOT / self.test.split("::")[0]

    @property
    def function(self) -> str | None:
        return self.test.split("::")[1] if "::" in self.test else None


KINDS = {  # how a test covers a technique on a family
    "e2e": "on a headless WebUI with a random checkpoint",
    "backend": "on a tiny model built from the host's own classes, through its sampler",
}


@dataclass(frozen=True)
class Technique:
    key: str  # the technique's spec prefix
    label: str  # its column in the table
    tests: Mapping[str, Tested]  # served family -> its test
    refused: str  # why a family outside the technique's FAMILIES is refused ...
    reasons: Mapping[str, str] = field(default_factory=dict)  # ... unless the family has its own reason here
    default_test: Tested | None = None  # the test of a served family without its own entry

    def reason(self, family: str) -> str:
        """Why the technique refuses `family` (the run-time error says this too)."""
        if family == "other":
            return UNKNOWN
        return self.reasons.get(family, self.refused)

    def test(self, family: str) -> Tested | None:
        return self.tests.get(family, self.default_test)


_E2E = "e2e"
_BACKEND = "backend"

_DIT_TEST = Tested("tests/e2e/test_refdrop_dit_backend.py", _BACKEND)
REFDROP = Technique(
    "refdrop",
    "RefDrop",
    {
        "sd15": Tested("tests/e2e/test_refdrop.py", _E2E),
        "sdxl": Tested("tests/e2e/test_sdxl.py::test_sdxl_refdrop_record_use", _E2E),
        "flux": Tested("tests/e2e/test_refdrop_flux_backend.py", _BACKEND),
        "chroma": Tested("tests/e2e/test_refdrop_flux_backend.py", _BACKEND),
        # every other DiT family RefDrop knows is covered by the tiny-model test that runs over all of them
        **{family: _DIT_TEST for family in DIT if family not in ("flux", "chroma")},
    },
    "RefDrop does not know this model's self-attention layers yet (no layer table or attention site for it), so it "
    "cannot tell which layers to record and which tokens are the image's",
)

REDUX = Technique(
    "redux",
    "Redux",
    {
        "flux": Tested("tests/e2e/test_redux_flux_backend.py", _BACKEND),
        "chroma": Tested("tests/e2e/test_redux_flux_backend.py", _BACKEND),
    },
    "the Redux projector makes tokens in Flux.1's T5-XXL text space, and this model's prompt comes from another text "
    "encoder, so appended Redux tokens would mean nothing to it",
    {
        "sd3": "SD3 reads T5-XXL tokens too, but the Redux projector was trained for Flux.1's blocks only; its tokens "
        "have never been tried on SD3",
        "wan": "Wan's prompt comes from UMT5-XXL, another T5 (other vocabulary and weights) than the Flux.1 T5-XXL "
        "whose space the Redux projector was trained for",
    },
)

HRMIX = Technique(
    "hrmix",
    "Hires mixing",
    {"sd15": Tested("tests/e2e/test_mixing.py", _E2E)},
    "its sampler's state is not a latent on a noise schedule the mixer reproduces",
    {
        "pid": "Forge Neo runs PiD in img2img only (its txt2img stops with 'PiD does not support txt2img'), and hires "
        "fix is the second pass of a txt2img job, so there is no hires pass to mix",
    },
    default_test=Tested("tests/e2e/test_mixing_backend.py", _BACKEND),
)

FLEXDIFFUSE = Technique(
    "flexdiffuse",
    "CLIP image guidance",
    {
        "sd15": Tested("tests/e2e/test_flexdiffuse.py", _E2E),
        "sdxl": Tested("tests/e2e/test_flexdiffuse.py::test_sdxl_two_encoders", _E2E),
    },
    "it moves the prompt's CLIP text tokens (SD1.5's CLIP-L, SDXL's CLIP-L + CLIP-G) toward CLIP vision tokens, and "
    "this model's prompt is not encoded by those CLIP text towers",
    {
        "sd2": "SD2.x's prompt is OpenCLIP ViT-H/14 text tokens, a tower the guidance has no vision counterpart for "
        "(it pairs CLIP-L and CLIP-G)",
        "sdxl_refiner": "the SDXL refiner's prompt is CLIP-G tokens alone, without the CLIP-L half the guidance edits "
        "together with it",
        "sd3": "SD3's prompt is CLIP-L + CLIP-G tokens zero-padded to T5's width and joined with T5-XXL tokens in one "
        "sequence, a layout the guidance (written for SD1.5's and SDXL's CLIP-only prompts) does not know",
    },
)

STYLE = Technique(
    "style_model",
    "Style model",
    {"sd15": Tested("tests/e2e/test_style_model.py", _E2E)},
    "the T2I-Adapter style model makes 768-d tokens for SD1.x's CLIP-L cross-attention, and this model's "
    "cross-attention takes tokens of another width or text space",
)

UNCLIP = Technique(
    "unclip",
    "unCLIP",
    {"sd2": Tested("tests/e2e/test_unclip.py", _E2E)},
    "the image embedding goes into the ADM input (`label_emb`) of an SD2.1 unCLIP UNet, and this model has none",
)

TECHNIQUES: dict[str, Technique] = {t.key: t for t in (REFDROP, REDUX, HRMIX, FLEXDIFFUSE, STYLE, UNCLIP)}


def loaded() -> list[str]:
    """Every family some host loads, each once (in HOSTS' order: Forge 2.0's, then Neo's others)."""
    return list(dict.fromkeys(f for families in HOSTS.values() for f in families))


@dataclass(frozen=True)
class Cell:
    served: bool
    tested: Tested | None = None  # served
    reason: str = ""  # refused


def cells(served: Mapping[str, Iterable[str]], families: Iterable[str]) -> dict[tuple[str, str], Cell]:
    """(technique, family) -> Cell for every technique of TECHNIQUES and every family of `families`; `served` maps a
    technique to its FAMILIES. ValueError when the statement and the code disagree (see `check`)."""
    check(served)
    out = {}
    for key, technique in TECHNIQUES.items():
        mine = set(served[key])
        for family in families:
            if family in mine:
                out[key, family] = Cell(True, tested=technique.test(family))
            else:
                out[key, family] = Cell(False, reason=technique.reason(family))
    return out


def check(served: Mapping[str, Iterable[str]]) -> None:
    """ValueError naming every disagreement: a technique without FAMILIES, a served family without a test (or with a
    refusal reason), a test entry for a family the technique refuses, a test file that does not exist."""
    problems = []
    if set(served) != set(TECHNIQUES):
        problems.append(f"techniques {sorted(set(TECHNIQUES) ^ set(served))} are on one side only")
    for key, technique in TECHNIQUES.items():
        mine = set(served.get(key, ()))
        for family in sorted(mine):
            tested = technique.test(family)
            if tested is None:
                problems.append(f"{key} serves {family} without a test reference")
            if family in technique.reasons:
                problems.append(f"{key} serves {family} but gives a reason for refusing it")
        for family in sorted(set(technique.tests) - mine):
            problems.append(f"{key} refuses {family} but names a test for it ({technique.tests[family].test})")
        for tested in {*technique.tests.values(), technique.default_test} - {None}:
            if tested.kind not in KINDS:
                problems.append(f"{key}: {tested.test} has the unknown kind {tested.kind!r}")
            if not tested.path.is_file():
                problems.append(f"{key}: the test {tested.test} does not exist")
            elif tested.function and f"def {tested.function}(" not in tested.path.read_text(encoding="utf-8"):
                problems.append(f"{key}: {tested.path.name} has no test {tested.function}")
        if not technique.refused.strip() or not all(r.strip() for r in technique.reasons.values()):
            problems.append(f"{key}: an empty refusal reason")
    if problems:
        raise ValueError("the family table disagrees with the code: " + "; ".join(problems))
