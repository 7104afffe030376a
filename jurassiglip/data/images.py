"""Decoding any image file or Pillow mode to 8-bit RGB.

The manifest builder (training images) and inference (`jurassiglip predict`)
both go through `to_rgb`, so a 16-bit or palette image is read the same way
in training and at prediction time. Inference reads files through
`read_image`, which also turns a photo upright by its EXIF orientation.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

ORIENTATION = 0x0112  # the EXIF tag: 1 upright, 2-8 mirrored and/or rotated (6: turn 90° clockwise to view)

# Pillow opens 16-bit greyscale PNG/TIFF as one of these. Its own
# convert("RGB") clips values above 255 instead of rescaling, which would turn
# most of a 16-bit image white. "I" (32-bit) is assumed to hold 16-bit data,
# as it does when it comes from a 16-bit PNG.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    1, L, P, RGBA, LA, CMYK, YCbCr... go through Pillow (alpha is dropped, not
    composited). 16-bit modes are rescaled 0..65535 -> 0..255 with rounding;
    float "F" images are clipped to 0..255.

    Args:
        image: a loaded PIL image of any mode.

    Returns:
        RGB PIL image of the same size.
    """
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        eight = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return Image.fromarray(eight).convert("RGB")
    if image.mode == "F":
        values = np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)
        return Image.fromarray(values).convert("RGB")
    return image.convert("RGB")


def read_image(path: str | Path) -> Image.Image:
    """An image file as RGB, upright; a clear error naming the file otherwise.

    Upright: the EXIF orientation is applied (a phone stores a portrait photo
    as a landscape bitmap plus "rotate 90°"), so the image, and a mask made
    for it, have the orientation every viewer shows. Inference reads through
    here; the manifest builder does not: COCO masks are drawn on the stored
    pixels, which it checks against instances.json (see data/decode.py).
    Any PIL mode is converted to RGB (`to_rgb`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    try:
        with Image.open(path) as opened:
            opened.load()
            orientation = opened.getexif().get(ORIENTATION, 1)
            upright = ImageOps.exif_transpose(opened)  # a copy; orientation 1 or none: unchanged pixels
            if orientation != 1:
                log.info("%s: EXIF orientation %s applied (%dx%d stored, %dx%d upright)", path, orientation,
                         opened.width, opened.height, upright.width, upright.height)
            return to_rgb(upright).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: cannot read the image ({err})") from None
