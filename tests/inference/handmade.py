"""A hand-made manifest and a predictor whose answers are fixed per caption, for numbers worked by hand.

Shared by test_evaluate_by_hand.py and test_gallery.py (their fixtures are in conftest.py).

Three 4x4 images (drawn with `grid`), objects and answers chosen so that
every I, U and IoU can be counted on the squares below:

    image 0: A = rows 0-1 x cols 0-1 and B = rows 2-3 x cols 2-3 (objects A, B)
    image 1: C = row 3 (object C)
    image 2: D = col 0 and E = col 3 (objects D, E)

    split val:  s0 "the left square"  single, gt A      answer rows 0-1 x cols 0-2 (6 px), target
                s1 "both squares"     multi, gt A+B     answer A (4 px), target              (novel)
                s2 "the purple star"  no-target         answer row 0 x cols 2-3 (2 px), no-target
                s3 "the bottom bar"   single, gt C      answer row 3 x cols 0-2 (3 px), no-target (wrong)
                s4 "the red circle"   no-target         answer row 0 x cols 0-1 (2 px), target (wrong)  (novel)
    split test: t0 "the left bar"     single, gt D      answer D, target
                t1 "the right bar"    single, gt E      answer E, target
                t2 "the green star"   no-target         answer empty, no-target

The predictor stands in for the model only: the real `Predictor.infer` path
is checked against a per-sample reference in test_evaluate.py; here the
arithmetic around it (evaluate.py, gallery.py) is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from jurassiglip.data import masks
from jurassiglip.data.manifest import Manifest
from jurassiglip.inference.predictor import Inference

SIDE = 4


def grid(*rows: str) -> np.ndarray:
    """A bool mask drawn as text: '#' foreground, '.' background."""
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


A = grid("##..", "##..", "....", "....")
B = grid("....", "....", "..##", "..##")
C = grid("....", "....", "....", "####")
D = grid("#...", "#...", "#...", "#...")
E = grid("...#", "...#", "...#", "...#")
EMPTY = np.zeros((SIDE, SIDE), dtype=bool)

# image_index, image_id, split, objects
IMAGES = [(0, 100, "val", A | B), (1, 101, "val", C), (2, 102, "test", D | E)]
# sample_id, image_index, split, sentence, kind, novel, target
SAMPLES = [
    (0, 0, "val", "the left square", "single", False, A),
    (1, 0, "val", "both squares", "multi", True, A | B),
    (2, 0, "val", "the purple star", "no_target", False, EMPTY),
    (3, 1, "val", "the bottom bar", "single", False, C),
    (4, 1, "val", "the red circle", "no_target", True, EMPTY),
    (5, 2, "test", "the left bar", "single", False, D),
    (6, 2, "test", "the right bar", "single", False, E),
    (7, 2, "test", "the green star", "no_target", False, EMPTY),
]
# caption -> (mask at 4x4, no-target verdict, no-target probability)
ANSWERS = {
    "the left square": (grid("###.", "###.", "....", "...."), False, 0.1),
    "both squares": (A, False, 0.2),
    "the purple star": (grid("..##", "....", "....", "...."), True, 0.9),
    "the bottom bar": (grid("....", "....", "....", "###."), True, 0.7),
    "the red circle": (grid("##..", "....", "....", "...."), False, 0.3),
    "the left bar": (D, False, 0.1),
    "the right bar": (E, False, 0.1),
    "the green star": (EMPTY, True, 0.8),
}


def hand_manifest() -> Manifest:
    """The manifest of the module docstring, in memory (every image 4x4 at training and original size)."""
    images_table = pd.DataFrame({
        "image_index": [i for i, *_ in IMAGES], "image_id": [image_id for _, image_id, *_ in IMAGES],
        "file_name": [f"img{i}.png" for i, *_ in IMAGES], "split": [split for _, _, split, _ in IMAGES],
        "height": SIDE, "width": SIDE,
        "objects_rle": [masks.encode(objects)["counts"] for *_, objects in IMAGES]})
    samples = pd.DataFrame({
        "sample_id": [s[0] for s in SAMPLES], "ref_id": [1000 + s[0] for s in SAMPLES],
        "sent_id": [2000 + s[0] for s in SAMPLES], "image_id": [IMAGES[s[1]][1] for s in SAMPLES],
        "image_index": [s[1] for s in SAMPLES], "mask_index": [s[0] for s in SAMPLES],
        "split": [s[2] for s in SAMPLES], "sentence": [s[3] for s in SAMPLES],
        "no_target": [s[4] == "no_target" for s in SAMPLES], "n_targets": [int(s[6].any()) for s in SAMPLES],
        "kind": [s[4] for s in SAMPLES], "novel": [s[5] for s in SAMPLES], "template": "",
        "height": SIDE, "width": SIDE, "mask_rle": [masks.encode(s[6])["counts"] for s in SAMPLES]})
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(len(IMAGES), SIDE, SIDE, 3), dtype=np.uint8)
    target_bits = masks.pack(np.stack([s[6] for s in SAMPLES]))
    object_bits = masks.pack(np.stack([objects for *_, objects in IMAGES]))
    return Manifest(Path("hand-made"), samples, images_table, pixels, SIDE, target_bits, object_bits)


@dataclass
class ScriptedPredictor:
    """`Predictor.infer`'s interface with the answers of ANSWERS, at any size asked (each pixel a block)."""

    calls: list[dict] = field(default_factory=list)

    def infer(self, images, captions, owner, sizes, *, full_images=None, window_stride=0.5) -> list[Inference]:
        self.calls.append({"n_images": len(images), "captions": list(captions), "owner": list(owner),
                           "sizes": [tuple(s) for s in sizes]})
        results = []
        for caption, (height, width) in zip(captions, sizes):
            mask, no_target, no_target_prob = ANSWERS[caption]
            big = np.kron(mask, np.ones((height // SIDE, width // SIDE), dtype=bool))
            prob = np.where(big, 0.75, 0.25).astype(np.float32)
            results.append(Inference(prob=torch.from_numpy(prob), mask=torch.from_numpy(big),
                                     no_target_prob=no_target_prob, no_target=no_target))
        return results
