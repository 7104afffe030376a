"""A tiny gRefCOCO-format dataset written into tmp_path, shared by the data tests.

Six non-square images, one per Pillow mode the manifest must convert (RGB JPEG,
L, RGBA, P, CMYK JPEG, 16-bit I;16 PNG), with annotations in every COCO form
(polygon, uncompressed RLE, compressed RLE, a crowd RLE, a polygon with a
2-point part, a polygon that is only a 2-point part) and refs that are
single-target, multi-target (one including the crowd object) and no-target.
Tests mutate `refs` / `instances` and call `write()` to produce bad inputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from coco_rle import uncompressed_rle
from pycocotools import mask as coco_mask

# image_id -> (file_name, height, width, Pillow mode)
IMAGES = {
    1: ("rgb.jpg", 30, 40, "RGB"),
    2: ("gray.png", 36, 24, "L"),
    3: ("rgba.png", 20, 32, "RGBA"),
    4: ("pal.png", 28, 44, "P"),
    5: ("cmyk.jpg", 32, 24, "CMYK"),
    6: ("deep.png", 24, 36, "I;16"),
}


def block(height: int, width: int, rows: slice, cols: slice) -> np.ndarray:
    """A bool (H, W) mask with one filled rectangle."""
    m = np.zeros((height, width), dtype=bool)
    m[rows, cols] = True
    return m


def compressed_rle(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _annotations() -> list[dict]:
    def ann(ann_id, image_id, seg, iscrowd=0):
        return {"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": seg,
                "iscrowd": iscrowd, "area": 1.0, "bbox": [0, 0, 1, 1]}

    return [
        ann(101, 1, [[4, 4, 16, 4, 16, 14, 4, 14]]),
        ann(102, 1, [[20, 5, 35, 5, 28, 20], [1, 1, 2, 2]]),  # second part: 2 points, dropped
        ann(103, 1, uncompressed_rle(block(30, 40, slice(20, 28), slice(2, 12))), iscrowd=1),
        ann(104, 1, [[5, 5, 6, 6]]),  # only a 2-point part: no usable segmentation
        ann(201, 2, uncompressed_rle(block(36, 24, slice(2, 12), slice(3, 20)))),
        ann(202, 2, compressed_rle(block(36, 24, slice(20, 33), slice(5, 15)))),
        ann(301, 3, [[3, 3, 20, 3, 20, 15, 3, 15]]),
        ann(401, 4, compressed_rle(block(28, 44, slice(4, 20), slice(30, 42)))),
        ann(402, 4, [[2, 2, 14, 2, 8, 20]]),
        ann(501, 5, [[2, 4, 18, 4, 18, 28, 2, 28]]),
        ann(601, 6, [[1, 1, 20, 1, 20, 12, 1, 12]]),
    ]


def _ref(ref_id, image_id, split, ann_id, sents, no_target=False, **extra):
    sentences = [{"sent_id": ref_id * 10 + j, "sent": s, "raw": s, "tokens": s.split()} for j, s in enumerate(sents)]
    ref = {"ref_id": ref_id, "image_id": image_id, "split": split, "ann_id": ann_id,
           "category_id": [1] * len(ann_id) if ann_id != [-1] else [-1], "sentences": sentences,
           "no_target": no_target, "file_name": IMAGES[image_id][0]}
    ref.update(extra)
    return ref


def _refs() -> list[dict]:
    return [
        _ref(1, 1, "train", [101], ["the box on the left", "left box"]),
        _ref(2, 1, "train", [101, 102, 103], ["all the things"]),  # 103 is crowd: skipped
        _ref(3, 1, "train", [-1], ["the purple star"], no_target=True),
        _ref(4, 2, "train", [201, 202], ["both blocks"]),
        _ref(5, 3, "val", [301], ["the red triangle", "red triangle"], novel=True),
        _ref(6, 4, "val", [-1], ["the blue circle"], no_target=True),
        _ref(7, 4, "val", [401, 402], ["the two shapes"]),
        _ref(8, 5, "testA", [501], ["the tall box"]),
        _ref(9, 6, "testB", [601], ["the wide box"]),
        _ref(10, 6, "testB", [-1], ["the green star"], no_target=True),
        _ref(11, 2, "other", [201], ["a block in a split nobody asks for"]),
    ]


def _draw(image_id: int, anns: list[dict]) -> Image.Image:
    """Draw an image of the given mode with its objects in a lighter value."""
    _, h, w, mode = IMAGES[image_id]
    objects = np.zeros((h, w), dtype=bool)
    for a in anns:
        if a["image_id"] != image_id:
            continue
        seg = a["segmentation"]
        if isinstance(seg, list):
            img = Image.new("L", (w, h))
            for part in seg:
                if len(part) >= 6:
                    ImageDraw.Draw(img).polygon(part, fill=1)
            objects |= np.asarray(img, dtype=bool)
        elif isinstance(seg["counts"], list):
            objects |= coco_mask.decode(coco_mask.frPyObjects(seg, h, w)).astype(bool)
        else:
            objects |= coco_mask.decode(seg).astype(bool)
    y, x = np.mgrid[0:h, 0:w]
    if mode == "I;16":
        # left half bright (65535 -> 255), right half mid (32896 -> 128): Pillow's
        # own convert would clip both to 255.
        return Image.fromarray(np.where(x < w // 2, 65535, 32896).astype(np.uint16))
    rgb = np.stack([np.where(objects, 220, 30), (x * 5) % 256, (y * 7) % 256], axis=-1).astype(np.uint8)
    base = Image.fromarray(rgb)
    if mode == "L":
        return base.convert("L")
    if mode == "P":
        return base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return base.convert(mode)


@dataclass
class TinyData:
    """Paths and raw JSON of the tiny dataset; edit refs/instances then call write()."""

    root: Path
    refs: list[dict]
    instances: dict
    images_dir: Path = field(init=False)
    grefs_path: Path = field(init=False)
    instances_path: Path = field(init=False)

    def __post_init__(self):
        self.images_dir = self.root / "images"
        self.grefs_path = self.root / "grefs(unc).json"
        self.instances_path = self.root / "instances.json"

    def write(self) -> "TinyData":
        self.grefs_path.write_text(json.dumps(self.refs))
        self.instances_path.write_text(json.dumps(self.instances))
        return self

    def ann(self, ann_id: int) -> dict:
        return next(a for a in self.instances["annotations"] if a["id"] == ann_id)

    def ref(self, ref_id: int) -> dict:
        return next(r for r in self.refs if r["ref_id"] == ref_id)


def make_tiny(root: Path) -> TinyData:
    anns = _annotations()
    instances = {
        "images": [{"id": i, "file_name": f, "height": h, "width": w} for i, (f, h, w, _) in IMAGES.items()],
        "annotations": anns,
        "categories": [{"id": 1, "name": "shape", "supercategory": "shape"}],
    }
    data = TinyData(root, _refs(), instances)
    data.images_dir.mkdir(parents=True)
    for image_id, (file_name, *_rest) in IMAGES.items():
        _draw(image_id, anns).save(data.images_dir / file_name)
    return data.write()


@pytest.fixture
def tiny(tmp_path: Path) -> TinyData:
    return make_tiny(tmp_path / "tiny")


def coco_union(data: TinyData, ann_ids, height: int, width: int) -> np.ndarray:
    """Reference target: pycocotools frPyObjects / merge / decode, skipping crowd and <3-point parts."""
    rles = []
    for ann_id in ann_ids:
        a = data.ann(ann_id)
        if a["iscrowd"]:
            continue
        seg = a["segmentation"]
        if isinstance(seg, list):
            parts = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
            if parts:
                rles.append(coco_mask.merge(coco_mask.frPyObjects(parts, height, width)))
        elif isinstance(seg["counts"], list):
            rles.append(coco_mask.frPyObjects(seg, height, width))
        else:
            rles.append({"size": seg["size"], "counts": seg["counts"].encode()})
    if not rles:
        return np.zeros((height, width), dtype=bool)
    return coco_mask.decode(coco_mask.merge(rles, intersect=0)).astype(bool)


@pytest.fixture
def reference_union():
    """The pycocotools reference for a union of annotation masks, as a function."""
    return coco_union
