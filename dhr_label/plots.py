"""Small charts for reports (``tune``'s sweeps, precision against coverage): points and lines on
two axes, drawn with PIL. Pure: numbers in, an RGB array out."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .visual import PAD, TEXT_SIZE, _draw_text, _text_width

WIDTH, HEIGHT = 520, 340
MARGIN_LEFT, MARGIN_BOTTOM, MARGIN_TOP, MARGIN_RIGHT = 64, 44, 30, 16


@dataclass(frozen=True)
class Series:
    """Points to draw: ``points`` (x, y); ``line`` joins them in x order; ``colour`` RGB."""

    name: str
    points: tuple[tuple[float, float], ...]
    colour: tuple[int, int, int] = (31, 119, 180)
    line: bool = False
    radius: int = 3


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values spanning [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / max(1, count - 1)
    step = 10 ** math.floor(math.log10(raw))
    step *= min((m for m in (1, 2, 5, 10) if m * step >= raw), default=10)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}"


def render_chart(series: list[Series], *, title: str, x_label: str, y_label: str, x_log: bool = False,
                 marked: tuple[float, float] | None = None, categories: list[str] | None = None) -> np.ndarray:
    """A chart of ``series``; ``marked`` (x, y) gets a red ring; ``categories`` names the integer
    x positions 0..n-1 instead of numbers (for enum parameters). Returns (H, W, 3) uint8."""
    points = [p for s in series for p in s.points if all(map(math.isfinite, p))]
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    _draw_text(draw, (MARGIN_LEFT, PAD), title)
    if not points:
        _draw_text(draw, (MARGIN_LEFT, HEIGHT // 2), "no data")
        return np.asarray(image)
    fx = (lambda x: math.log10(x)) if x_log else (lambda x: x)
    xs, ys = [fx(x) for x, _ in points], [y for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    pad_x, pad_y = 0.06 * (x1 - x0), 0.08 * (y1 - y0)
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y
    left, right, top, bottom = MARGIN_LEFT, WIDTH - MARGIN_RIGHT, MARGIN_TOP, HEIGHT - MARGIN_BOTTOM

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (left + (fx(x) - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    for y in _ticks(y0, y1):
        _, py = to_pixel(10 ** x0 if x_log else x0, y)
        draw.line([(left - 4, py), (left, py)], fill=(120, 120, 120))
        draw.line([(left + 1, py), (right - 1, py)], fill=(235, 235, 235))
        text = _label(y)
        _draw_text(draw, (left - 6 - _text_width(text), py - TEXT_SIZE // 2), text)
    x_ticks = [float(i) for i in range(len(categories))] if categories else _ticks(x0, x1)
    for tick in x_ticks:
        x = 10**tick if x_log and not categories else tick
        px, _ = to_pixel(x, y0)
        draw.line([(px, bottom), (px, bottom + 4)], fill=(120, 120, 120))
        text = categories[int(tick)] if categories else _label(x)
        _draw_text(draw, (px - _text_width(text) // 2, bottom + 6), text)
    _draw_text(draw, ((left + right - _text_width(x_label)) // 2, HEIGHT - TEXT_SIZE - PAD), x_label)
    _draw_text(draw, (PAD, top - TEXT_SIZE - 2), y_label)
    for s in series:
        shown = sorted(p for p in s.points if all(map(math.isfinite, p)))
        pixels = [to_pixel(x, y) for x, y in shown]
        if s.line and len(pixels) > 1:
            draw.line(pixels, fill=s.colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - s.radius, py - s.radius, px + s.radius, py + s.radius], fill=s.colour)
    if marked is not None and all(map(math.isfinite, marked)):
        px, py = to_pixel(*marked)
        draw.ellipse([px - 7, py - 7, px + 7, py + 7], outline=(214, 39, 40), width=2)
    legend_x = right - 4
    for s in reversed(series):
        legend_x -= _text_width(s.name) + 18
        draw.ellipse([legend_x, PAD + 3, legend_x + 8, PAD + 11], fill=s.colour)
        _draw_text(draw, (legend_x + 12, PAD), s.name)
    return np.asarray(image)
