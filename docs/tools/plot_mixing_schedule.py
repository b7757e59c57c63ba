"""Draw docs/images/mixing-schedule.png: the weight on the noised upscaled latent z′ per hires step, for each schedule
of Hires iterative mixing at its default parameters, computed by the extension's own `zprime_weights`.

Pillow only (no matplotlib), so it runs in the test environment:

    python docs/tools/plot_mixing_schedule.py            # writes docs/images/mixing-schedule.png
    python docs/tools/plot_mixing_schedule.py out.png    # writes elsewhere
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lib_imgcond.mixing.schedules import MixParams, zprime_weights  # noqa: E402

STEPS = 20  # the hires step count the panel's own plot uses
WIDTH, HEIGHT = 720, 400
LEFT, RIGHT, TOP, BOTTOM = 64, 200, 60, 56  # margins around the plot area
CURVES = (  # (schedule, legend label, colour)
    ("demofusion_cosine", "demofusion_cosine", (31, 119, 180)),
    ("im_cosine", "im_cosine", (214, 39, 40)),
    ("linear", "linear", (44, 160, 44)),
    ("logistic", "logistic", (148, 103, 189)),
)
GREY, BLACK, WHITE = (200, 200, 200), (0, 0, 0), (255, 255, 255)


def curves(steps: int = STEPS) -> dict[str, list[float]]:
    """The z′ weight of each step for every schedule, every other parameter at its default."""
    return {schedule: zprime_weights(MixParams(schedule=schedule), steps) for schedule, _, _ in CURVES}


def draw(steps: int = STEPS) -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT), WHITE)
    d = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP  # y0: the bottom (weight 0)

    def px(i: float) -> float:
        return x0 + (x1 - x0) * i / (steps - 1)

    def py(w: float) -> float:
        return y0 - (y0 - y1) * w

    for k in range(5):  # horizontal grid and y ticks: 0, 0.25 … 1
        w = k / 4
        d.line([(x0, py(w)), (x1, py(w))], fill=GREY)
        label = f"{w:g}"
        d.text((x0 - 8 - d.textlength(label, font=font), py(w) - 6), label, fill=BLACK, font=font)
    for i in range(0, steps, 5 if steps > 10 else 1):  # x ticks: hires step index
        d.line([(px(i), y0), (px(i), y0 + 5)], fill=BLACK)
        label = str(i)
        d.text((px(i) - d.textlength(label, font=font) / 2, y0 + 8), label, fill=BLACK, font=font)
    d.line([(x0, y0), (x1, y0)], fill=BLACK)
    d.line([(x0, y0), (x0, y1)], fill=BLACK)
    title = f"Hires iterative mixing: weight on z' per hires step ({steps} steps, defaults: alpha 3, blend 0-1)"
    d.text((8, 12), title, fill=BLACK, font=font)
    xlabel = "hires step i"
    d.text(((x0 + x1) / 2 - d.textlength(xlabel, font=font) / 2, y0 + 26), xlabel, fill=BLACK, font=font)
    d.text((8, y1 - 26), "weight w_i on z'", fill=BLACK, font=font)

    values = curves(steps)
    for schedule, _, colour in CURVES:
        points = [(px(i), py(w)) for i, w in enumerate(values[schedule])]
        d.line(points, fill=colour, width=2)
        for x, y in points:
            d.ellipse([(x - 2, y - 2), (x + 2, y + 2)], fill=colour)

    lx, ly = x1 + 16, y1 + 8  # legend, to the right of the plot
    d.text((lx, ly), "schedule", fill=BLACK, font=font)
    for k, (_, label, colour) in enumerate(CURVES):
        y = ly + 22 + 20 * k
        d.line([(lx, y + 6), (lx + 24, y + 6)], fill=colour, width=3)
        d.text((lx + 30, y), label, fill=BLACK, font=font)
    notes = ("demofusion_cosine:", " DemoFusion's skip", " residual (default)", "im_cosine: Iterative", " Mixing's")
    notes += (" cosine",)
    for k, line in enumerate(notes):
        d.text((lx, ly + 22 + 20 * len(CURVES) + 12 + 14 * k), line, fill=BLACK, font=font)
    return image


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "docs" / "images" / "mixing-schedule.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    draw().quantize(colors=16).save(out, optimize=True)
    sys.stdout.write(f"{out}: {out.stat().st_size} bytes\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
