"""The loss curve: as a PNG drawn with pillow (no matplotlib in the WebUI's or the engine's dependencies), and
as rows for an interactive plot."""
from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw

from ..sidecar import atomic_write_bytes

W, H = 900, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 30, 45
TRAIN_RAW, TRAIN_AVG, VAL = (190, 205, 230), (30, 90, 200), (220, 80, 30)


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


def loss_rows(train: list[tuple[int, float]], val: list[tuple[int, float]],
              max_points: int = 500) -> list[tuple[str, int, float]]:
    """(curve, step, loss) rows: the training loss and its moving average at no more than ``max_points``
    evenly spaced steps (the last one always), and every validation loss."""
    stride = max(1, math.ceil(len(train) / max_points))
    kept = sorted(range(len(train) - 1, -1, -stride))
    average = smoothed(train)
    return ([("training loss", train[i][0], train[i][1]) for i in kept]
            + [("moving average", train[i][0], average[i]) for i in kept]
            + [("validation loss", s, v) for s, v in val])


def render(train: list[tuple[int, float]], val: list[tuple[int, float]], title: str) -> Image.Image:
    """Training loss (raw, light; moving average, dark) and validation loss (points joined) over steps."""
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((LEFT, 8), title, fill="black")
    points = train + val
    if not points:
        d.text((LEFT, H // 2), "no steps yet", fill="black")
        return img
    x_max = max(s for s, _ in points) or 1
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad

    def xy(step: float, value: float) -> tuple[float, float]:
        x = LEFT + (W - LEFT - RIGHT) * step / x_max
        y = TOP + (H - TOP - BOTTOM) * (1 - (value - lo) / (hi - lo))
        return x, y

    for k in range(5):
        value = lo + (hi - lo) * k / 4
        y = xy(0, value)[1]
        d.line([(LEFT, y), (W - RIGHT, y)], fill=(235, 235, 235))
        d.text((4, y - 6), f"{value:.4g}", fill="black")
    for k in range(5):
        step = round(x_max * k / 4)
        x = xy(step, lo)[0]
        d.text((x - 10, H - BOTTOM + 8), str(step), fill="black")
    d.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline="black")
    d.text((W // 2 - 15, H - 18), "step", fill="black")
    if train:
        steps = [s for s, _ in train]
        if len(train) > 1:
            d.line([xy(s, v) for s, v in train], fill=TRAIN_RAW, width=1)
            d.line([xy(s, v) for s, v in zip(steps, smoothed(train))], fill=TRAIN_AVG, width=2)
        d.text((W - RIGHT - 230, TOP + 6), "training loss (moving average)", fill=TRAIN_AVG)
    if val:
        pts = [xy(s, v) for s, v in val]
        if len(pts) > 1:
            d.line(pts, fill=VAL, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=VAL)
        d.text((W - RIGHT - 230, TOP + 20), "validation loss", fill=VAL)
    return img


def write_loss_curve(path: str, train: list[tuple[int, float]], val: list[tuple[int, float]], title: str) -> None:
    buf = io.BytesIO()
    render(train, val, title).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
