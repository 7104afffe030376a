"""Pictures of predictions for the validation gallery: arrays in, images out.

Everything here is pure: functions take numpy arrays (and strings) and return
numpy arrays or PIL images. Saving files and logging them to MLflow is the
caller's job (the render_val stage; the HTML page is gallery.gallery_html).

One panel shows one image and one row per caption:

    [ image, ground truth outlined | TP / FP / FN over a pale copy | probability heatmap ]

Colours come from the Okabe-Ito palette, chosen to stay distinct under the
common colour-vision deficiencies; every colour is also named in the panel's
legend, and a wrong no-target verdict is spelt out in words, not only in red.

Shapes: H x W image or mask; masks are bool, images uint8 RGB.

Why one long module: every picture the project draws (overlay colours, heatmap scale, panel layout,
legend) shares one palette and one set of drawing helpers; all of it is pure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]
# Pillow's bundled fonts: FreeType (scalable) or, as a fallback, a fixed bitmap.
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont
# A legend entry: pieces ("swatch", colour), ("text", label) or ("bar",), left to right.
LegendUnit = tuple[tuple, ...]

# Okabe & Ito (2008), "Color Universal Design": bluish green, orange and blue
# keep apart for deuteranopes and protanopes, and differ in lightness too.
TP_COLOR: RGB = (0, 158, 115)
FP_COLOR: RGB = (230, 159, 0)
FN_COLOR: RGB = (0, 114, 178)
# Ground-truth outline in the first tile: the palette's yellow, so it never
# reads as one of the three error colours of the second tile.
GT_COLOR: RGB = (240, 228, 66)

# (short label, colour, meaning) for each error class, in drawing order.
ERROR_LEGEND: tuple[tuple[str, RGB, str], ...] = (
    ("TP", TP_COLOR, "predicted and in ground truth"),
    ("FP", FP_COLOR, "predicted, not in ground truth"),
    ("FN", FN_COLOR, "in ground truth, missed"),
)

# Anchor colours of a viridis-like map (dark purple -> blue -> teal -> green ->
# yellow). Their Rec. 601 luma rises strictly (about 30, 82, 111, 157, 215),
# and linear interpolation preserves that, so brightness is monotone in p and
# the map survives greyscale printing and colour-blind viewers.
_HEATMAP_ANCHORS = np.array(
    [
        (68, 1, 84),
        (59, 82, 139),
        (33, 145, 140),
        (94, 201, 98),
        (253, 231, 37),
    ],
    dtype=np.float64,
)
_HEATMAP_LUT = np.stack(
    [
        np.interp(np.linspace(0.0, 1.0, 256), np.linspace(0.0, 1.0, len(_HEATMAP_ANCHORS)), channel)
        for channel in _HEATMAP_ANCHORS.T
    ],
    axis=1,
).round().astype(np.uint8)  # (256, 3)

# Panel layout, in pixels.
_MARGIN = 12
_GAP = 8
_TEXT_COLOR: RGB = (20, 20, 20)
_MUTED_COLOR: RGB = (90, 90, 90)
_WRONG_COLOR: RGB = (200, 0, 0)
_BACKGROUND: RGB = (255, 255, 255)
_HEADER_SIZE = 18
_TEXT_SIZE = 14
_SMALL_SIZE = 12
_MAX_CAPTION_LINES = 3
# Width of the heatmap colour bar in the legend; a divisor of 256, the LUT length.
_BAR_W = 64


@dataclass(frozen=True, eq=False)
class RowSpec:
    """One caption of a panel: what was asked, what is true, what was predicted.

    Attributes:
        caption: the referring expression.
        gt: (H, W) bool ground-truth mask (empty for a no-target expression).
        pred: (H, W) bool predicted mask.
        prob: (H, W) float foreground probability in [0, 1].
        iou: the sample's IoU as gIoU counts it (see metrics.sample_iou).
        gt_nt: the expression refers to nothing in the image.
        pred_nt: the model called it no-target.
    """

    caption: str
    gt: np.ndarray
    pred: np.ndarray
    prob: np.ndarray
    iou: float
    gt_nt: bool
    pred_nt: bool


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    return image


def _check_mask(name: str, mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"{name} must be a bool mask, got dtype {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {mask.shape}, expected {shape}")
    return mask


def _blend(image: np.ndarray, where: np.ndarray, color: RGB, alpha: float) -> np.ndarray:
    """Alpha-blend ``color`` over ``image`` where ``where`` holds, in place on a copy.

    Only the masked pixels go through float: a float copy of a whole
    8000x8000 image would take 768 MB.
    """
    out = image.copy()
    blended = (1.0 - alpha) * image[where].astype(np.float32) + alpha * np.asarray(color, dtype=np.float32)
    out[where] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


def overlay_mask(image: np.ndarray, mask: np.ndarray, color: RGB, alpha: float = 0.5) -> np.ndarray:
    """Tint the masked pixels of an image with one colour.

    Args:
        image: (H, W, 3) uint8.
        mask: (H, W) bool.
        color: RGB triple, 0..255.
        alpha: weight of the colour; 0 leaves the image, 1 paints solid.

    Returns:
        (H, W, 3) uint8; pixels outside the mask are unchanged.
    """
    image = _check_image(image)
    mask = _check_mask("mask", mask, image.shape[:2])
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return _blend(image, mask, color, alpha)


PREDICTION_COLOR: RGB = (0, 158, 115)  # bluish green (Okabe-Ito): the mask `predict` and the demo draw


def prediction_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The overlay `jurassiglip predict` writes and the demo shows: mask in PREDICTION_COLOR on the image."""
    return overlay_mask(image, mask, color=PREDICTION_COLOR)


def overlay_errors(image: np.ndarray, pred: np.ndarray, gt: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Colour true positives, false positives and false negatives of a mask.

    TP = pred AND gt in TP_COLOR, FP = pred AND NOT gt in FP_COLOR,
    FN = gt AND NOT pred in FN_COLOR; see ERROR_LEGEND.

    Args:
        image: (H, W, 3) uint8.
        pred: (H, W) bool predicted mask.
        gt: (H, W) bool ground-truth mask.
        alpha: weight of the colours over the image.

    Returns:
        (H, W, 3) uint8; true negatives are unchanged.
    """
    image = _check_image(image)
    pred = _check_mask("pred", pred, image.shape[:2])
    gt = _check_mask("gt", gt, image.shape[:2])
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    # The three classes are disjoint, so blending them one after the other
    # never tints a pixel twice.
    out = _blend(image, pred & gt, TP_COLOR, alpha)
    out = _blend(out, pred & ~gt, FP_COLOR, alpha)
    return _blend(out, gt & ~pred, FN_COLOR, alpha)


def wash_out(image: np.ndarray, strength: float = 0.55) -> np.ndarray:
    """Greyscale and lighten an image so that overlay colours read true.

    Tinting a red object with the TP colour gives a muddy brown that matches
    no legend entry; on a pale grey backdrop each class keeps its own hue.

    Args:
        image: (H, W, 3) uint8.
        strength: how far the grey is pushed toward white, 0..1.

    Returns:
        (H, W, 3) uint8 with three equal channels.
    """
    image = _check_image(image)
    # Rec. 601 luma: the usual brightness weights of R, G, B.
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = (1.0 - strength) * luma + strength * 255.0
    return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def mask_outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The band of ``width`` pixels just inside the border of a mask.

    Args:
        mask: (H, W) bool.
        width: thickness in pixels.

    Returns:
        (H, W) bool, a subset of ``mask``; pixels on the image border count as
        mask border, so a mask touching the edge is still closed.
    """
    mask = np.asarray(mask, dtype=bool)
    inner = mask
    for _ in range(width):
        # 4-neighbour erosion, with everything outside the image counted as background.
        padded = np.pad(inner, 1, constant_values=False)
        inner = (
            padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
    return mask & ~inner


def spotlight(
    image: np.ndarray, mask: np.ndarray, color: RGB = GT_COLOR, dim: float = 0.5, width: int = 2
) -> np.ndarray:
    """Show a mask on an image without hiding the object's own colours.

    Pixels outside the mask are darkened and the mask gets an outline, so an
    expression such as "all red shapes" can be checked against the true
    colours inside. An empty mask (a no-target expression) dims everything.

    Args:
        image: (H, W, 3) uint8.
        mask: (H, W) bool.
        color: outline colour.
        dim: how far pixels outside the mask are pulled toward black, 0..1.
        width: outline thickness in pixels.

    Returns:
        (H, W, 3) uint8.
    """
    image = _check_image(image)
    mask = _check_mask("mask", mask, image.shape[:2])
    out = _blend(image, ~mask, (0, 0, 0), dim)
    out[mask_outline(mask, width)] = color
    return out


def heatmap(prob: np.ndarray) -> np.ndarray:
    """Colour a probability map with a viridis-like perceptual colormap.

    Args:
        prob: (H, W) float in [0, 1]; values outside are clipped, NaN reads 0.

    Returns:
        (H, W, 3) uint8; dark purple at 0, yellow at 1, brightness rising
        monotonically in between.
    """
    prob = np.asarray(prob, dtype=np.float64)
    if prob.ndim != 2:
        raise ValueError(f"prob must be (H, W), got shape {prob.shape}")
    index = np.rint(np.clip(np.nan_to_num(prob, nan=0.0), 0.0, 1.0) * 255).astype(np.intp)
    return _HEATMAP_LUT[index]


def _font(size: int) -> Font:
    """Pillow's bundled font at ``size``; the fixed-size bitmap font before Pillow 10.1."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _drawable(text: str, font: Font) -> str:
    """Make ``text`` safe for ``font``: the bitmap fallback font only encodes Latin-1."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _line_height(font: Font) -> int:
    # "Ag" spans ascender to descender, so lines never touch.
    bbox = font.getbbox("Ag")
    return int(bbox[3]) + 4


def _wrap(
    text: str, font: Font, width: int, max_lines: int
) -> list[str]:
    """Greedy word wrap to ``width`` pixels, at most ``max_lines`` lines (last one ellipsised)."""
    text = _drawable(" ".join(text.split()), font)
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        # A single word wider than the line is cut by characters.
        while font.getlength(word) > width and len(word) > 1:
            cut = len(word)
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "..."]
    return lines or [""]


def _tile_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(width, height) scaling the longest side to ``tile`` while keeping the aspect."""
    scale = tile / max(height, width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    # Nearest keeps mask edges crisp and every pixel exactly in or out.
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    return np.asarray(resized) > 127


def _resize_prob(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    prob = np.nan_to_num(np.asarray(prob, dtype=np.float32), nan=0.0)
    return np.asarray(Image.fromarray(prob).resize(size, Image.Resampling.BILINEAR))


def _verdict(no_target: bool) -> str:
    return "no target" if no_target else "target"


def _status_lines(
    row: RowSpec, font: Font, width: int
) -> list[list[tuple[int, str, RGB]]]:
    """Lay out "IoU 0.42   gt: target   pred: no target (wrong)" within ``width`` pixels.

    Returns:
        Lines of (x offset, text, colour); a segment that does not fit moves
        to the next line whole. A wrong verdict says "(wrong)" as well as
        turning red, for readers who cannot tell red apart.
    """
    wrong = bool(row.pred_nt) != bool(row.gt_nt)
    segments = (
        (f"IoU {_format_iou(row.iou)}", _TEXT_COLOR),
        (f"gt: {_verdict(row.gt_nt)}", _TEXT_COLOR),
        (
            f"pred: {_verdict(row.pred_nt)}" + (" (wrong)" if wrong else ""),
            _WRONG_COLOR if wrong else _TEXT_COLOR,
        ),
    )
    lines: list[list[tuple[int, str, RGB]]] = [[]]
    x = 0
    for text, color in segments:
        w = int(font.getlength(text))
        if lines[-1] and x + w > width:
            lines.append([])
            x = 0
        lines[-1].append((x, text, color))
        x += w + 3 * _GAP
    return lines


def _format_iou(iou: float) -> str:
    return "n/a" if iou is None or not math.isfinite(iou) else f"{iou:.2f}"


def panel(
    image: np.ndarray,
    rows: Sequence[RowSpec],
    image_id: str | int | None = None,
    tile: int = 192,
) -> Image.Image:
    """One gallery panel: an image and one row of three tiles per caption.

    Each row has a text band (caption, wrapped; IoU with 2 decimals; ground
    truth and predicted no-target verdicts, the prediction in red with
    "(wrong)" when it disagrees) above three tiles: the image in its own
    colours with the ground truth outlined and the rest dimmed (see
    spotlight), the prediction's TP / FP / FN over a washed-out copy of the
    image (see wash_out, overlay_errors), and the probability heatmap. A
    legend of the colours closes the panel. Masks may be at a different resolution
    from the image (e.g. a square evaluation size): every tile is resized to
    the same size, bilinear for the image and probabilities, nearest for masks.

    Args:
        image: (H, W, 3) uint8.
        rows: one RowSpec per caption; masks of any size (h, w).
        image_id: shown in the header when given.
        tile: length in pixels of the longest side of each tile.

    Returns:
        An RGB PIL image, 3 tiles wide, taller with every row.
    """
    image = _check_image(image)
    if tile < 16:
        raise ValueError(f"tile must be at least 16 pixels, got {tile}")
    tw, th = _tile_size(image.shape[0], image.shape[1], tile)
    content_w = 3 * tw + 2 * _GAP
    text_font, small_font = _font(_TEXT_SIZE), _font(_SMALL_SIZE)

    # First build the tiles and lay out the text, so the canvas height is known.
    base = _resize_image(image, (tw, th))
    pale = wash_out(base)
    blocks = [_row_block(k, row, base, pale, text_font, content_w) for k, row in enumerate(rows)]
    # Column titles wrap within their tile, so narrow (portrait) tiles never collide.
    column_titles = [
        _wrap(name, small_font, tw, 2) for name in ("ground truth", "prediction: TP / FP / FN", "probability")
    ]
    legend_lines = _legend_layout(small_font, content_w)
    text_h, small_h = _line_height(text_font), _line_height(small_font)
    height = _MARGIN + _line_height(_font(_HEADER_SIZE)) + max(len(t) for t in column_titles) * small_h + _GAP
    for caption, status, _ in blocks:
        height += (len(caption) + len(status)) * text_h + 2 + th + _GAP * 2
    height += _GAP + len(legend_lines) * (small_h + 4) + _MARGIN

    canvas = Image.new("RGB", (content_w + 2 * _MARGIN, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = _draw_header(draw, "image" if image_id is None else f"image {image_id}", column_titles, tw)
    for block in blocks:
        y = _draw_row(canvas, draw, block, y, content_w, th)
    _draw_legend(canvas, draw, legend_lines, y + _GAP)
    return canvas


# A laid-out row: caption lines, status lines (see _status_lines), and its three tiles.
RowBlock = tuple[list[str], list[list[tuple[int, str, RGB]]], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _row_block(k: int, row: RowSpec, base: np.ndarray, pale: np.ndarray, font: Font, width: int) -> RowBlock:
    """Row ``k``'s wrapped caption, status line and tiles (ground truth, TP/FP/FN, heatmap) at the size of ``base``."""
    gt = np.asarray(row.gt, dtype=bool)
    pred = np.asarray(row.pred, dtype=bool)
    if gt.shape != pred.shape or np.shape(row.prob) != gt.shape:
        raise ValueError(
            f"row {k}: gt, pred and prob must share one shape, got "
            f"{gt.shape}, {pred.shape}, {np.shape(row.prob)}"
        )
    size = (base.shape[1], base.shape[0])  # (tw, th)
    gt_tile = _resize_mask(gt, size)
    pred_tile = _resize_mask(pred, size)
    tiles = (
        spotlight(base, gt_tile),
        overlay_errors(pale, pred_tile, gt_tile, alpha=0.8),
        heatmap(_resize_prob(row.prob, size)),
    )
    caption = _wrap(f'"{row.caption}"', font, width, _MAX_CAPTION_LINES)
    return caption, _status_lines(row, font, width), tiles


def _draw_header(draw: ImageDraw.ImageDraw, title: str, column_titles: list[list[str]], tw: int) -> int:
    """The panel title and the column titles; returns the y where the first row starts."""
    header_font, small_font = _font(_HEADER_SIZE), _font(_SMALL_SIZE)
    small_h = _line_height(small_font)
    y = _MARGIN
    draw.text((_MARGIN, y), _drawable(title, header_font), font=header_font, fill=_TEXT_COLOR)
    y += _line_height(header_font)
    for col, lines in enumerate(column_titles):
        for k, line in enumerate(lines):
            draw.text((_MARGIN + col * (tw + _GAP), y + k * small_h), line, font=small_font, fill=_MUTED_COLOR)
    return y + max(len(lines) for lines in column_titles) * small_h + _GAP


def _draw_row(canvas: Image.Image, draw: ImageDraw.ImageDraw, block: RowBlock, y: int, content_w: int,
              th: int) -> int:
    """One caption's text band and tiles from ``y``; returns the y of the next row."""
    caption, status, tiles = block
    text_font = _font(_TEXT_SIZE)
    text_h = _line_height(text_font)
    # A hairline separates rows so each caption visibly owns its tiles.
    draw.line([(_MARGIN, y - _GAP // 2), (_MARGIN + content_w, y - _GAP // 2)], fill=(210, 210, 210))
    for line in caption:
        draw.text((_MARGIN, y), line, font=text_font, fill=_TEXT_COLOR)
        y += text_h
    for line in status:
        for x, text, color in line:
            draw.text((_MARGIN + x, y), text, font=text_font, fill=color)
        y += text_h
    y += 2
    tw = tiles[0].shape[1]
    for col, tile_array in enumerate(tiles):
        canvas.paste(Image.fromarray(tile_array), (_MARGIN + col * (tw + _GAP), y))
    return y + th + _GAP * 2


def _draw_legend(canvas: Image.Image, draw: ImageDraw.ImageDraw, legend_lines: list[list[LegendUnit]],
                 y: int) -> None:
    """The colour legend (see _legend_layout), its first line at ``y``."""
    small_font = _font(_SMALL_SIZE)
    small_h = _line_height(small_font)
    for line in legend_lines:
        x = _MARGIN
        for unit in line:
            for piece in unit:
                if piece[0] == "swatch":
                    box = [x, y + 2, x + small_h - 6, y + small_h - 4]
                    draw.rectangle(box, fill=piece[1], outline=_TEXT_COLOR)
                elif piece[0] == "bar":
                    bar = _HEATMAP_LUT[None, :: 256 // _BAR_W]  # (1, _BAR_W, 3)
                    canvas.paste(Image.fromarray(np.repeat(bar, small_h - 6, axis=0)), (x, y + 2))
                else:
                    draw.text((x, y), piece[1], font=small_font, fill=_TEXT_COLOR)
                x += _piece_width(piece, small_font)
            x += 2 * _GAP
        y += small_h + 4


def _legend_units() -> list[LegendUnit]:
    """Legend entries, each a unit of pieces drawn left to right and never split."""
    units: list[LegendUnit] = [(("swatch", GT_COLOR), ("text", "ground truth"))]
    units += [(("swatch", color), ("text", f"{label}: {meaning}")) for label, color, meaning in ERROR_LEGEND]
    units.append((("text", "probability 0"), ("bar",), ("text", "1")))
    return units


def _piece_width(piece: tuple, font: Font) -> int:
    if piece[0] == "swatch":
        return _line_height(font)
    if piece[0] == "bar":
        return _BAR_W + 4
    return int(font.getlength(piece[1])) + 4


def _legend_layout(font: Font, width: int) -> list[list[LegendUnit]]:
    """Flow the legend units into lines no wider than ``width`` pixels."""
    lines: list[list[LegendUnit]] = [[]]
    x = 0
    for unit in _legend_units():
        w = sum(_piece_width(piece, font) for piece in unit) + 2 * _GAP
        if lines[-1] and x + w > width:
            lines.append([])
            x = 0
        lines[-1].append(unit)
        x += w
    return lines
