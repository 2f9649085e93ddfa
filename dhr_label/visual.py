"""Pictures for people: mask overlays with legends, side-by-side panels, the confusion matrix,
and the HTML index that lays panels out. Pure: arrays and names in, arrays / bytes / text out.
"""
from __future__ import annotations

import functools
import html
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Share of a class colour in an overlay pixel.
OVERLAY_ALPHA = 0.6
TEXT_SIZE = 13
PAD = 4
SWATCH = 12
IGNORE_COLOUR = (255, 255, 255)


# -- text ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _text_width(text: str, size: int = TEXT_SIZE) -> int:
    left, _, right, _ = _font(size).getbbox(text)
    return right - left


def _draw_text(draw: ImageDraw.ImageDraw, xy, text: str, fill="black", size: int = TEXT_SIZE) -> None:
    font = _font(size)
    left, top, _, _ = font.getbbox(text)
    draw.text((xy[0] - left, xy[1] - top), text, font=font, fill=fill)


def _fit(text: str, width: int, size: int = TEXT_SIZE) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if _text_width(text, size) <= width:
        return text
    while text and _text_width(text + "…", size) > width:
        text = text[:-1]
    return text + "…" if text else ""


# -- overlays -----------------------------------------------------------------------------
def overlay(image: np.ndarray, mask: np.ndarray, palette, *, ignore_index: int = 255,
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """``image`` with every pixel tinted by its class colour.

    Parameters
    ----------
    image : (H, W, 3) uint8
    mask : (H, W) uint8 class ids; ``ignore_index`` pixels are tinted white.
    palette : flat RGB list of 256 entries (a preset's palette).
    alpha : share of the class colour, in [0, 1].

    Returns
    -------
    (H, W, 3) uint8, a new array.
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image is {image.shape[0]} x {image.shape[1]} but the mask is "
                         f"{mask.shape[0]} x {mask.shape[1]} (H x W)")
    colours = np.asarray(palette, dtype=np.float32).reshape(-1, 3)[:256].copy()
    if 0 <= ignore_index < len(colours):
        colours[ignore_index] = IGNORE_COLOUR
    tint = colours[mask]
    blended = (1 - alpha) * image.astype(np.float32) + alpha * tint
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def legend_entries(mask: np.ndarray, names, *, ignore_index: int = 255) -> list[tuple[int, str]]:
    """(value, label) of every value present in ``mask``, in id order: class names,
    ``ignore`` and ``id N (no class)`` for values outside the class list."""
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    entries = []
    for value in present.tolist():
        if value < len(names):
            entries.append((value, names[value]))
        elif value == ignore_index:
            entries.append((value, "ignore"))
        else:
            entries.append((value, f"id {value} (no class)"))
    return entries


def _legend_rows(entries, width: int) -> list[list[tuple[int, str]]]:
    rows, row, used = [], [], 0
    for value, label in entries:
        label = _fit(label, width - SWATCH - 2 * PAD)
        need = SWATCH + PAD + _text_width(label) + 2 * PAD
        if row and used + need > width:
            rows.append(row)
            row, used = [], 0
        row.append((value, label))
        used += need
    if row:
        rows.append(row)
    return rows


def _draw_legend(draw, x0: int, y0: int, rows, palette, ignore_index: int) -> None:
    line = max(SWATCH, TEXT_SIZE) + PAD
    for r, row in enumerate(rows):
        x, y = x0, y0 + r * line
        for value, label in row:
            colour = IGNORE_COLOUR if value == ignore_index else tuple(palette[3 * value: 3 * value + 3])
            draw.rectangle([x, y, x + SWATCH - 1, y + SWATCH - 1], fill=colour, outline=(90, 90, 90))
            _draw_text(draw, (x + SWATCH + PAD, y), label)
            x += SWATCH + PAD + _text_width(label) + 2 * PAD


# -- panels -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """One picture of a panel: a title, the picture, and the mask its legend lists (if any)."""

    title: str
    picture: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray | None = None


def fit_width(image: np.ndarray, max_width: int, *, nearest: bool = False) -> np.ndarray:
    """``image`` scaled down (aspect kept) so that it is at most ``max_width`` wide."""
    h, w = image.shape[:2]
    if w <= max_width:
        return image
    size = (max_width, max(1, round(h * max_width / w)))
    method = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(image).resize(size, method))


def panel_layout(width: int, height: int, n_tiles: int, legend_lines: int) -> tuple[int, int]:
    """Width and height of a panel of ``n_tiles`` tiles of ``width`` x ``height`` pixels."""
    caption = TEXT_SIZE + 2 * PAD
    legend = legend_lines * (max(SWATCH, TEXT_SIZE) + PAD) + (PAD if legend_lines else 0)
    return n_tiles * width + (n_tiles + 1) * PAD, caption + height + legend + 2 * PAD


def render_panel(tiles: list[Tile], names, palette, *, ignore_index: int = 255) -> np.ndarray:
    """Tiles side by side, each with its title above and the legend of its mask below.

    All pictures must have the same size. Returns an (H, W, 3) uint8 array whose size is
    :func:`panel_layout` of the tiles.
    """
    h, w = tiles[0].picture.shape[:2]
    for tile in tiles:
        if tile.picture.shape[:2] != (h, w):
            raise ValueError(f"tile {tile.title!r} is {tile.picture.shape[:2]}, expected {(h, w)}")
    legends = [
        _legend_rows(legend_entries(t.mask, names, ignore_index=ignore_index), w) if t.mask is not None else []
        for t in tiles
    ]
    lines = max(len(rows) for rows in legends)
    width, height = panel_layout(w, h, len(tiles), lines)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    caption = TEXT_SIZE + 2 * PAD
    for i, (tile, rows) in enumerate(zip(tiles, legends)):
        x = PAD + i * (w + PAD)
        _draw_text(draw, (x, PAD + PAD // 2), _fit(tile.title, w))
        canvas.paste(Image.fromarray(np.ascontiguousarray(tile.picture)), (x, caption))
        _draw_legend(draw, x, caption + h + PAD, rows, palette, ignore_index)
    return np.asarray(canvas)


def missing_tile(height: int, width: int) -> np.ndarray:
    """A grey picture standing for a mask that does not exist."""
    return np.full((height, width, 3), 200, dtype=np.uint8)


# -- confusion matrix ---------------------------------------------------------------------
def render_confusion(confusion: np.ndarray, names) -> np.ndarray:
    """The confusion matrix as an RGB heat map, row-normalised (each GT class sums to 100 %).

    Parameters
    ----------
    confusion : (C, C + 1) int64; rows ground truth, columns prediction, last "not a class".
    names : C class names.

    Returns
    -------
    (H, W, 3) uint8: cell (g, p) goes from white (0 %) to dark blue (100 % of g's pixels
    predicted p); rows without ground-truth pixels stay white; percentages are written in
    cells large enough to hold them.
    """
    c = confusion.shape[0]
    if confusion.shape != (c, c + 1) or len(names) != c:
        raise ValueError(f"expected a (C, C + 1) matrix and C names, found {confusion.shape} and {len(names)}")
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    cell = int(np.clip(900 // max(c, 1), 6, 36))
    size = int(np.clip(cell * 0.6, 8, 14))
    labels = [_fit(n, 160, size) for n in list(names) + ["(not a class)"]]
    label_w = max(_text_width(n, size) for n in labels) + 2 * PAD
    title_h = 2 * size + 4 * PAD
    left, top = 2 * PAD + label_w, title_h + label_w
    image = Image.new("RGB", (left + (c + 1) * cell + 2 * PAD, top + c * cell + 2 * PAD), "white")
    light, dark = np.array([255.0, 255, 255]), np.array([8.0, 48, 107])
    cells = (light + share[..., None] * (dark - light)).round().astype(np.uint8)
    image.paste(Image.fromarray(np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)), (left, top))
    draw = ImageDraw.Draw(image)
    _draw_text(draw, (2 * PAD, 2 * PAD), "rows: ground truth; columns: prediction; % of the row", size=size)
    for g in range(c):
        _draw_text(draw, (2 * PAD, top + g * cell + (cell - size) // 2), labels[g], size=size)
    strip = Image.new("RGB", (label_w, (c + 1) * cell), "white")
    strip_draw = ImageDraw.Draw(strip)
    for p in range(c + 1):  # column names, written across then turned a quarter
        _draw_text(strip_draw, (PAD, p * cell + (cell - size) // 2), labels[p], size=size)
    image.paste(strip.rotate(90, expand=True), (left, title_h))
    if cell >= 24:
        value_size = max(8, cell // 3)
        for g, p in zip(*np.nonzero((share >= 0.005) & (rows > 0))):
            text = f"{100 * share[g, p]:.0f}"
            x = left + p * cell + (cell - _text_width(text, value_size)) // 2
            y = top + g * cell + (cell - value_size) // 2
            _draw_text(draw, (x, y), text, "white" if share[g, p] > 0.5 else "black", value_size)
    grey = (200, 200, 200)
    for k in range(c + 2):
        draw.line([(left + k * cell, top), (left + k * cell, top + c * cell)], fill=grey)
    for k in range(c + 1):
        draw.line([(left, top + k * cell), (left + (c + 1) * cell, top + k * cell)], fill=grey)
    return np.asarray(image)


# -- files --------------------------------------------------------------------------------
def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, found {rgb.dtype} {rgb.shape}")
    buffer = io.BytesIO()
    # Level 1: panels are photographs; level 6 is 3x slower for 10 % smaller files.
    Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def index_html(entries: list[dict], *, title: str, columns: list[str], sorted_by: str | None) -> str:
    """A page laying out panels for browsing.

    ``entries``: dicts with ``id``, ``file`` (relative path of the panel) and ``scores``
    (a list of per-image mIoU, one per column, None when unknown), in display order.
    """
    esc = html.escape
    legend = " | ".join(esc(c) for c in columns)
    order = f"sorted by {esc(sorted_by)}, worst first" if sorted_by else "in id order"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em}figure{margin:0 0 1.5em 0}"
        "img{max-width:100%;border:1px solid #ccc}figcaption{font-size:0.9em;color:#333}</style>",
        "</head><body>", f"<h1>{esc(title)}</h1>",
        f"<p>{len(entries)} images, {order}. Tiles: {legend}.</p>",
    ]
    for entry in entries:
        scores = ", ".join(
            f"{esc(c)} {'-' if s is None else f'{100 * s:.1f}'}" for c, s in zip(columns, entry["scores"])
        ) if entry["scores"] else ""
        anchor = esc(entry["id"], quote=True)
        parts.append(
            f'<figure id="{anchor}"><figcaption><a href="#{anchor}">{esc(entry["id"])}</a>'
            + (f" — mIoU {scores}" if scores else "")
            + f'</figcaption><img src="{esc(entry["file"], quote=True)}" loading="lazy" '
            f'alt="{anchor}"></figure>'
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
