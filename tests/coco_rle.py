"""COCO uncompressed RLE written by hand, for tests that must not use the code under test to make their inputs."""

from __future__ import annotations

import numpy as np


def uncompressed_counts(mask: np.ndarray) -> list[int]:
    """Alternating background/foreground run lengths of a bool mask, column-major, starting with background."""
    flat = mask.flatten(order="F").astype(bool)
    counts, current, run = [], False, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return counts


def uncompressed_rle(mask: np.ndarray) -> dict:
    """{"size": [h, w], "counts": [...]} as COCO stores an uncompressed (crowd) segmentation."""
    return {"size": list(mask.shape), "counts": uncompressed_counts(mask)}
