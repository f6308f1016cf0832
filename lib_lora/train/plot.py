"""The loss curve: as a PNG drawn with pillow (no matplotlib in the WebUI's or the engine's dependencies) for
the output folder, and as an SVG for the Train LoRA tab (a plot component would load 4.6 MB of vega into every
page of the WebUI). Both draw the same chart."""
from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..sidecar import atomic_write_bytes

W, H = 900, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 30, 45
TRAIN_RAW, TRAIN_AVG, VAL = (190, 205, 230), (30, 90, 200), (220, 80, 30)
TICKS = 5
MAX_POINTS = 500  # of the training curves in the SVG: one per pixel column at most


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def smoothed(train: list[tuple[int, float]]) -> list[float]:
    """The training loss's moving average over a twentieth of the run."""
    raw = [v for _, v in train]
    return moving_average(raw, max(1, len(raw) // 20))


def thinned(train: list[tuple[int, float]]) -> list[int]:
    """Indices of no more than MAX_POINTS evenly spaced steps of ``train``, the last one always."""
    stride = max(1, math.ceil(len(train) / MAX_POINTS))
    return sorted(range(len(train) - 1, -1, -stride))


@dataclass(frozen=True)
class Chart:
    """The axes of a drawing: steps from 0 to ``x_max`` across, losses from ``lo`` to ``hi`` up."""

    x_max: float
    lo: float
    hi: float

    @classmethod
    def of(cls, points: list[tuple[int, float]]) -> Chart:
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        pad = (hi - lo) * 0.05
        return cls(max(s for s, _ in points) or 1, lo - pad, hi + pad)

    def xy(self, step: float, value: float) -> tuple[float, float]:
        x = LEFT + (W - LEFT - RIGHT) * step / self.x_max
        y = TOP + (H - TOP - BOTTOM) * (1 - (value - self.lo) / (self.hi - self.lo))
        return x, y

    def y_ticks(self) -> list[tuple[str, float]]:
        values = [self.lo + (self.hi - self.lo) * k / (TICKS - 1) for k in range(TICKS)]
        return [(f"{v:.4g}", self.xy(0, v)[1]) for v in values]

    def x_ticks(self) -> list[tuple[str, float]]:
        steps = [round(self.x_max * k / (TICKS - 1)) for k in range(TICKS)]
        return [(str(s), self.xy(s, self.lo)[0]) for s in steps]


def render(train: list[tuple[int, float]], val: list[tuple[int, float]], title: str) -> Image.Image:
    """Training loss (raw, light; moving average, dark) and validation loss (points joined) over steps."""
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((LEFT, 8), title, fill="black")
    if not train and not val:
        d.text((LEFT, H // 2), "no steps yet", fill="black")
        return img
    chart = Chart.of(train + val)
    for label, y in chart.y_ticks():
        d.line([(LEFT, y), (W - RIGHT, y)], fill=(235, 235, 235))
        d.text((4, y - 6), label, fill="black")
    for label, x in chart.x_ticks():
        d.text((x - 10, H - BOTTOM + 8), label, fill="black")
    d.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline="black")
    d.text((W // 2 - 15, H - 18), "step", fill="black")
    if train:
        steps = [s for s, _ in train]
        if len(train) > 1:
            d.line([chart.xy(s, v) for s, v in train], fill=TRAIN_RAW, width=1)
            d.line([chart.xy(s, v) for s, v in zip(steps, smoothed(train))], fill=TRAIN_AVG, width=2)
        d.text((W - RIGHT - 230, TOP + 6), "training loss (moving average)", fill=TRAIN_AVG)
    if val:
        pts = [chart.xy(s, v) for s, v in val]
        if len(pts) > 1:
            d.line(pts, fill=VAL, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=VAL)
        d.text((W - RIGHT - 230, TOP + 20), "validation loss", fill=VAL)
    return img


def svg(train: list[tuple[int, float]], val: list[tuple[int, float]]) -> str:
    """The chart of ``render`` as inline SVG, scaled to its container's width; each point of the moving average and
    of the validation loss names its step and loss when hovered."""
    if not train and not val:
        return ""
    chart = Chart.of(train + val)

    def rgb(color: tuple[int, int, int]) -> str:
        return "rgb({},{},{})".format(*color)

    def line(points: list[tuple[float, float]], color: tuple[int, int, int], width: int) -> str:
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        return f"<polyline points='{coords}' fill='none' stroke='{rgb(color)}' stroke-width='{width}'/>"

    def dots(points: list[tuple[int, float]], curve: str, color: str, r: int) -> str:
        return "".join(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='{r}' fill='{color}'>"
                       f"<title>{html.escape(curve)}, step {s}: {v:.5g}</title></circle>"
                       for (s, v), (x, y) in ((p, chart.xy(*p)) for p in points))

    parts = [f"<svg class='sdlora-loss' viewBox='0 0 {W} {H}' xmlns='http://www.w3.org/2000/svg' role='img' "
             "font-size='17' font-family='sans-serif' fill='currentColor'>",  # text in the theme's colour
             f"<rect x='{LEFT}' y='{TOP}' width='{W - LEFT - RIGHT}' height='{H - TOP - BOTTOM}' fill='none' "
             "stroke='currentColor'/>"]
    for label, y in chart.y_ticks():
        parts.append(f"<line x1='{LEFT}' y1='{y:.1f}' x2='{W - RIGHT}' y2='{y:.1f}' stroke='currentColor' stroke-opacity='0.15'/>"
                     f"<text x='{LEFT - 6}' y='{y + 6:.1f}' text-anchor='end'>{label}</text>")
    for label, x in chart.x_ticks():
        parts.append(f"<text x='{x:.1f}' y='{H - BOTTOM + 20}' text-anchor='middle'>{label}</text>")
    parts.append(f"<text x='{W // 2}' y='{H - 8}' text-anchor='middle'>step</text>")
    if train:
        kept = thinned(train)
        average = smoothed(train)
        if len(train) > 1:
            parts.append(line([chart.xy(*train[i]) for i in kept], TRAIN_RAW, 1))
            parts.append(line([chart.xy(train[i][0], average[i]) for i in kept], TRAIN_AVG, 2))
        parts.append(dots([(train[i][0], average[i]) for i in kept], "training loss (moving average)",
                          "transparent", 4))
        parts.append(f"<text x='{LEFT}' y='{TOP - 9}' fill='{rgb(TRAIN_AVG)}'>training loss (moving average)</text>")
    if val:
        if len(val) > 1:
            parts.append(line([chart.xy(*p) for p in val], VAL, 2))
        parts.append(dots(val, "validation loss", rgb(VAL), 3))
        parts.append(f"<text x='{W - RIGHT}' y='{TOP - 9}' text-anchor='end' fill='{rgb(VAL)}'>validation loss</text>")
    return "".join(parts) + "</svg>"


def write_loss_curve(path: str, train: list[tuple[int, float]], val: list[tuple[int, float]], title: str) -> None:
    buf = io.BytesIO()
    render(train, val, title).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
