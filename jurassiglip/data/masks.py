"""Binary-mask helpers on top of pycocotools: COCO segmentations in, bool arrays out.

Every function here is pure (arrays and plain dicts in, arrays and dicts out);
reading annotation files and images lives in `refs.py` and `manifest.py`.

Conventions:
    - A mask is a bool array (H, W), H rows by W columns, as COCO stores sizes
      (`size == [height, width]`).
    - An RLE is COCO's compressed run-length dict `{"size": [H, W], "counts": str}`.
      Counts are kept as `str` (pycocotools produces `bytes`) so an RLE can go
      straight into JSON or a parquet string column.
    - A packed mask is the flat `np.packbits` of an (S, S) mask: S*S/8 bytes
      (rounded up) instead of S*S, for the training-size mask stores.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

# A polygon part is a flat [x0, y0, x1, y1, ...] list; below 3 points (6 numbers)
# it has no area. The official GRES/REFER loaders drop such parts, and
# pycocotools would even read a 4-number part as a bounding box.
MIN_POLYGON_COORDS = 6


class Converted(NamedTuple):
    """Result of `ann_to_rle`.

    rle: compressed RLE `{"size": [H, W], "counts": str}`, or None when the
        segmentation was a polygon list with no usable part left.
    dropped_parts: polygon parts dropped for having fewer than 3 points or an
        odd number of coordinates (always 0 for RLE input).
    """

    rle: dict | None
    dropped_parts: int


def split_polygon_parts(polygons: list) -> tuple[list[list[float]], int]:
    """Keep the polygon parts that have an area.

    Args:
        polygons: COCO polygon segmentation, a list of flat [x0, y0, x1, y1, ...] lists.

    Returns:
        (kept parts, number of parts dropped for < 3 points or odd length).

    Raises:
        ValueError: a part is not a list of numbers.
    """
    kept = []
    for part in polygons:
        if not isinstance(part, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in part
        ):
            raise ValueError(f"polygon part is not a list of numbers: {str(part)[:80]}")
        if len(part) >= MIN_POLYGON_COORDS and len(part) % 2 == 0:
            kept.append([float(v) for v in part])
    return kept, len(polygons) - len(kept)


def _str_counts(rle: dict) -> dict:
    """Copy an RLE with its counts as str (pycocotools returns bytes)."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def _check_size(rle: dict, height: int, width: int) -> None:
    size = rle.get("size")
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise ValueError(f"RLE size must be [height, width], got {size!r}")
    if [int(size[0]), int(size[1])] != [height, width]:
        raise ValueError(f"RLE size {list(size)} differs from the image size [{height}, {width}]")


def ann_to_rle(segmentation: Any, height: int, width: int) -> Converted:
    """Convert a COCO segmentation of any form to one compressed RLE.

    Args:
        segmentation: polygon list `[[x0, y0, ...], ...]`, uncompressed RLE
            `{"size": [H, W], "counts": [int, ...]}` or compressed RLE
            `{"size": [H, W], "counts": str | bytes}`.
        height: image height H in pixels.
        width: image width W in pixels.

    Returns:
        Converted(rle, dropped_parts); rle is None when no polygon part is usable.
        Several polygon parts are merged into one RLE (one object, several pieces).

    Raises:
        ValueError: unknown form, an RLE whose size is not [H, W], or
            uncompressed counts that do not cover H*W pixels.
    """
    if isinstance(segmentation, list):
        parts, dropped = split_polygon_parts(segmentation)
        if not parts:
            return Converted(None, dropped)
        rles = coco_mask.frPyObjects(parts, height, width)
        return Converted(_str_counts(coco_mask.merge(rles)), dropped)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        _check_size(segmentation, height, width)
        counts = segmentation["counts"]
        if isinstance(counts, list):
            # pycocotools trusts the counts; a short or long list would decode
            # to a silently wrong mask, so check it covers the image exactly.
            if sum(counts) != height * width:
                raise ValueError(
                    f"uncompressed RLE counts sum to {sum(counts)}, expected H*W = {height * width}"
                )
            rle = coco_mask.frPyObjects(dict(segmentation), height, width)
            return Converted(_str_counts(rle), 0)
        if isinstance(counts, (str, bytes)):
            return Converted(_str_counts(segmentation), 0)
        raise ValueError(f"RLE counts must be a list, str or bytes, got {type(counts).__name__}")
    raise ValueError(
        f"segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}"
    )


def decode(rle: dict) -> np.ndarray:
    """Decode a compressed RLE.

    Args:
        rle: `{"size": [H, W], "counts": str | bytes}`.

    Returns:
        bool mask (H, W).
    """
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return coco_mask.decode({"size": list(rle["size"]), "counts": counts}).astype(bool)


def encode(mask: np.ndarray) -> dict:
    """Encode a mask as compressed RLE with str counts.

    Args:
        mask: bool or 0/1 array (H, W).

    Returns:
        `{"size": [H, W], "counts": str}`.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    # pycocotools reads column-major uint8 only.
    return _str_counts(coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8)))


def rle_from_counts(counts: str, height: int, width: int) -> dict:
    """Rebuild an RLE dict from the counts string stored in a manifest column.

    Args:
        counts: compressed counts string.
        height: mask height H.
        width: mask width W.

    Returns:
        `{"size": [H, W], "counts": counts}`.
    """
    return {"size": [int(height), int(width)], "counts": counts}


def union(rles: list[dict], height: int, width: int) -> np.ndarray:
    """Pixel-wise OR of several RLEs (the target of a multi-object expression).

    Args:
        rles: compressed RLEs, each of size [H, W]; may be empty.
        height: H.
        width: W.

    Returns:
        bool mask (H, W); all False for an empty list (a no-target expression).
    """
    out = np.zeros((height, width), dtype=bool)
    for rle in rles:
        _check_size(rle, height, width)
        out |= decode(rle)
    return out


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a mask to the square training size.

    Bilinear on the float mask, then >= 0.5, so a thin object keeps the pixels
    it mostly covers. The aspect ratio is not kept, exactly like the images
    (the prototype stretched images to a square before the DINOv3 processor).

    Args:
        mask: bool array (H, W).
        size: output side S.

    Returns:
        bool mask (S, S).
    """
    as_float = Image.fromarray(mask.astype(np.float32))  # mode "F"
    resized = as_float.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized) >= 0.5


def packed_length(size: int) -> int:
    """Bytes of one packed (size, size) mask: ceil(S*S / 8)."""
    return math.ceil(size * size / 8)


def pack(mask: np.ndarray) -> np.ndarray:
    """Pack square masks 8 pixels per byte.

    Args:
        mask: bool (..., S, S).

    Returns:
        uint8 (..., ceil(S*S/8)), row-major pixel order.
    """
    flat = mask.reshape(*mask.shape[:-2], -1).astype(bool)
    return np.packbits(flat, axis=-1)


def unpack(bits: np.ndarray, size: int) -> np.ndarray:
    """Inverse of `pack`.

    Args:
        bits: uint8 (..., ceil(S*S/8)).
        size: side S.

    Returns:
        bool (..., S, S).
    """
    bits = np.asarray(bits, dtype=np.uint8)
    if bits.shape[-1] != packed_length(size):
        raise ValueError(
            f"packed masks have {bits.shape[-1]} bytes per row, "
            f"expected {packed_length(size)} for size {size}"
        )
    flat = np.unpackbits(bits, axis=-1, count=size * size)
    return flat.reshape(*bits.shape[:-1], size, size).astype(bool)
