"""Synthetic "shapes world" referring-segmentation dataset, written as gRefCOCO + COCO.

Why: the project must run end to end offline (SPEC §4), so the default data is
generated here, deterministically, in exactly the files the real gRefCOCO reader
consumes: `grefs(unc).json` (a list of refs), `instances.json` (COCO) and a folder
of `COCO_train2014_%012d.jpg` images. Each image holds a few coloured shapes;
expressions refer to one object ("the big blue square", "the leftmost circle"),
several ("all red shapes", "the two stars") or none ("the purple star" when there
is none). Val/test contain colour-shape pairs never seen in train, so
generalisation to novel attribute combinations can be measured.

Every shape is a polygon rasterised by pycocotools itself, so a polygon stored in
`instances.json` decodes to exactly the mask that was painted and counted.

Why one long module: the generator is one deterministic program (draw shapes, phrase refs, write
the gRefCOCO files); splitting it would scatter the RNG order that makes it byte-reproducible.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from jurassiglip.runtime import atomic

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star")  # category ids 1..4 in this order
COLOURS = {  # far apart in RGB so JPEG and jitter never blur two names together
    "red": (215, 40, 40), "green": (40, 160, 70), "blue": (40, 90, 215),
    "yellow": (235, 205, 30), "purple": (135, 60, 175), "orange": (245, 135, 25),
}
SIZE_RANGES = {"small": (0.08, 0.12), "big": (0.17, 0.25)}  # shape radius / short image side
# Outline per shape: vertex count, angle of the first vertex (degrees) and vertex
# radii relative to r (cycled). Radii are chosen so all shapes of one r cover about
# pi * r^2 pixels; a circle with 32 vertices is round to within a pixel at our sizes.
OUTLINES = {
    "circle": (32, 0.0, (1.0,)),
    "square": (4, 45.0, (1.27,)),
    "triangle": (3, -90.0, (1.5,)),
    "star": (10, -90.0, (1.6, 0.64)),
}
MAX_TILT = 15.0  # degrees of random rotation, small so a square never reads as a diamond
MIN_VISIBLE = 0.5  # an object must keep at least half of its pixels after occlusion
NOVEL_IMAGE_SHARE = 0.35  # val/test images forced to hold one novel colour-shape pair
UNCOMPRESSED_SHARE = 0.5  # of the RLE annotations, stored with integer run lengths
POSITION_MARGIN = 0.1  # "leftmost" needs a lead of this share of the image side
SIZE_MARGIN = 1.3  # "largest" needs this ratio in radius and in visible area
PLACEMENT_TRIES = 30
FREE_SPOT_TRIES = 10  # of those, the first ones demand a free spot (bounding circles apart)
NO_TARGET_TRIES = 30  # descriptions tried per image for no-target refs (of 105)
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
# Descriptions are (size, colour, shape) with None meaning "any"; ANY is "shape".
ALL_DESCS = tuple(itertools.product((None, *SIZE_RANGES), (None, *COLOURS), (None, *SHAPES)))
ANY = (None, None, None)
DIRECTIONS = (  # (axis, sign, phrasings in a group of 2, in a group of 3+, next to an anchor)
    ("x", -1, ("the {p} on the left", "the leftmost {p}"), ("the leftmost {p}", "the {p} furthest left"),
     ("the {p} left of the {a}", "the {p} to the left of the {a}")),
    ("x", 1, ("the {p} on the right", "the rightmost {p}"), ("the rightmost {p}", "the {p} furthest right"),
     ("the {p} right of the {a}", "the {p} to the right of the {a}")),
    ("y", -1, ("the {p} at the top", "the upper {p}"), ("the highest {p}", "the topmost {p}"),
     ("the {p} above the {a}", "the {p} over the {a}")),
    ("y", 1, ("the {p} at the bottom", "the lower {p}"), ("the lowest {p}", "the bottommost {p}"),
     ("the {p} below the {a}", "the {p} under the {a}")),
)
EXTREMES = (  # (sign on the radius, phrasings in a group of 2, in a group of 3+)
    (1, ("the bigger {p}", "the larger {p}"), ("the largest {p}", "the biggest {p}")),
    (-1, ("the smaller {p}",), ("the smallest {p}", "the tiniest {p}")),
)
KIND_GROUPS = {  # a ref slot picks a group uniformly, then a non-empty kind, then an expression
    "attribute": ("attribute",),
    "relation": ("position", "size", "anchor"),
    "multi": ("multi",),
    "none": ("absent", "absent_where", "count", "absent_novel"),
}

# What a caption asks the model to read, recorded per ref as "template" (an extra key of the
# gRefCOCO format that the reader carries into the manifest; evaluate reports metrics per template).
# Attribute expressions are split by the words they use (`_attribute_template`); the other kinds
# map to one template each.
TEMPLATES = ("attribute", "colour_only", "shape_only", "size_only", "position", "relation", "superlative",
             "multi", "no_target")
KIND_TEMPLATES = {"multi": "multi", "position": "position", "anchor": "relation", "size": "superlative",
                  "absent": "no_target", "absent_where": "no_target", "absent_novel": "no_target",
                  "count": "no_target"}


@dataclass(frozen=True)
class SyntheticFiles:
    """Where a generated dataset lives (the same three paths the gRefCOCO reader takes)."""

    grefs_path: Path
    instances_path: Path
    images_dir: Path


@dataclass(frozen=True)
class Shape:
    """One object as placed: attributes, centre and radius (pixels), outline polygon."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    r: float
    polygon: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Expr:
    """A candidate expression: who it targets, how it may be phrased, pairs it names."""

    kind: str
    targets: tuple[int, ...]
    phrasings: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...] = ()
    template: str = ""  # what the caption asks for (TEMPLATES); defaults to the kind's template


def generate(out_dir: Path, *, seed: int, n_images: dict[str, int], min_objects: int,
             max_objects: int, min_side: int, max_side: int, refs_per_image: int,
             no_target_share: float, novel_combos: list[str], rle_share: float) -> SyntheticFiles:
    """Generate the shapes-world dataset into `out_dir` (replaced atomically if present).

    Args:
        out_dir: target folder; written as a sibling temp folder, then renamed.
        seed: generator seed; the same seed gives byte-identical files.
        n_images: images per split, e.g. {"train": 2000, "val": 300, "test": 300};
            the key order is the split order, splits never share an image.
        min_objects, max_objects: objects per image (inclusive bounds).
        min_side, max_side: image width and height are drawn independently from this range.
        refs_per_image: referring expressions attempted per image (fewer if the
            image runs out of distinct unambiguous ones).
        no_target_share: probability that a ref slot names an absent object.
        novel_combos: colour-shape pairs such as "red triangle" that never occur in
            split "train" (not even in no-target text) but do in the others.
        rle_share: share of unoccluded annotations stored as RLE (occluded ones always are).

    Returns:
        The paths of `grefs(unc).json`, `instances.json` and the images folder.
    """
    _check_args(min_objects, max_objects, min_side, max_side, no_target_share, rle_share)
    novel = _parse_combos(novel_combos)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    with atomic.atomic_dir(out_dir) as tmp:
        instances, refs, kinds = _write_dataset(tmp, np.random.default_rng(seed), n_images,
                                                (min_objects, max_objects), (min_side, max_side),
                                                refs_per_image, no_target_share, novel, rle_share)
    log.info("synthetic: %d images, %d annotations, %d refs (%s) in %.1fs -> %s",
             len(instances["images"]), len(instances["annotations"]), len(refs),
             ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())),
             time.perf_counter() - started, out_dir)
    return SyntheticFiles(out_dir / "grefs(unc).json", out_dir / "instances.json", out_dir / "images")


def _check_args(min_objects, max_objects, min_side, max_side, no_target_share, rle_share):
    if not 1 <= min_objects <= max_objects <= max(NUMBER_WORDS):
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {max(NUMBER_WORDS)}, "
                         f"got {min_objects}, {max_objects}")
    if not 32 <= min_side <= max_side:
        raise ValueError(f"need 32 <= min_side <= max_side, got {min_side}, {max_side}")
    for name, share in (("no_target_share", no_target_share), ("rle_share", rle_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {share}")


def _parse_combos(novel_combos: list[str]) -> frozenset[tuple[str, str]]:
    pairs = set()
    for combo in novel_combos:
        words = combo.split()
        if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
            raise ValueError(f"novel combo {combo!r} is not '<colour> <shape>' with colour in "
                             f"{sorted(COLOURS)} and shape in {list(SHAPES)}")
        pairs.add((words[0], words[1]))
    return frozenset(pairs)


def _write_dataset(root, rng, n_images, n_objects, sides, refs_per_image, no_target_share,
                   novel, rle_share):
    """Draw every image in split order; write images, then the two JSON files."""
    (root / "images").mkdir()
    instances = {"images": [], "annotations": [],
                 "categories": [{"id": i + 1, "name": s, "supercategory": "shape"}
                                for i, s in enumerate(SHAPES)]}
    refs, kinds, sent_ids = [], Counter(), itertools.count(1)
    seen_pairs = sorted(set(itertools.product(COLOURS, SHAPES)) - novel)
    jobs = [(split, split == "train") for split in n_images for _ in range(n_images[split])]
    for image_id, (split, is_train) in enumerate(tqdm(jobs, desc="synthetic", disable=None), 1):
        height, width = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
        forced = None
        if not is_train and novel and rng.random() < NOVEL_IMAGE_SHARE:
            forced = sorted(novel)[rng.integers(len(novel))]
        shapes, full, visible = _layout(rng, height, width, n_objects, seen_pairs, forced)
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        Image.fromarray(_render(rng, height, width, shapes, visible)).save(
            root / "images" / file_name, "JPEG", quality=95)
        instances["images"].append({"id": image_id, "file_name": file_name,
                                    "height": height, "width": width})
        ann_ids = []
        for shape, f, v in zip(shapes, full, visible):
            ann_ids.append(len(instances["annotations"]) + 1)
            instances["annotations"].append(_annotation(rng, ann_ids[-1], image_id, shape, f, v,
                                                        rle_share))
        areas = [np.count_nonzero(v) for v in visible]
        cands = _candidates(rng, shapes, areas, height, width, novel, is_train)
        for expr, sents in _choose(rng, cands, refs_per_image, no_target_share):
            kinds[expr.kind] += 1
            refs.append(_ref(len(refs) + 1, sent_ids, image_id, split, file_name, expr, sents,
                             shapes, ann_ids, novel))
    _dump(root / "instances.json", instances)
    _dump(root / "grefs(unc).json", refs)
    return instances, refs, kinds


def _layout(rng, height, width, n_objects, seen_pairs, forced):
    """Place objects so each keeps at least MIN_VISIBLE of its pixels once all are drawn.

    Returns the shapes in drawing order, their full masks and their visible masks.
    """
    for _ in range(20):  # a crowded draw can place too few objects: redraw the image
        n = int(rng.integers(n_objects[0], n_objects[1] + 1))
        forced_at = int(rng.integers(n)) if forced else -1
        shapes, full, visible = [], [], []
        for k in range(n):
            colour, shape = forced if k == forced_at else seen_pairs[rng.integers(len(seen_pairs))]
            size = tuple(SIZE_RANGES)[rng.integers(len(SIZE_RANGES))]
            found = _place(rng, height, width, (shape, colour, size), shapes, full, visible)
            if found is not None:
                shapes.append(found[0])
                full.append(found[1])
                visible = found[2]
        if len(shapes) >= n_objects[0]:
            return shapes, full, visible
    raise RuntimeError(f"could not place {n_objects[0]} objects in a {width}x{height} image")


def _place(rng, height, width, attributes, placed, full, visible):
    """Try positions for one new (topmost) object; None if every try hides an older one.

    Returns (Shape, its mask, the updated visible masks of all objects so far).
    """
    shape, colour, size = attributes
    n_vertices, start, radii = OUTLINES[shape]
    for attempt in range(PLACEMENT_TRIES):
        r = min(height, width) * rng.uniform(*SIZE_RANGES[size])
        reach = r * max(radii)  # keeps every vertex inside the image
        cx, cy = rng.uniform(reach, width - reach), rng.uniform(reach, height - reach)
        tilt = rng.uniform(-MAX_TILT, MAX_TILT)
        # The first tries want a free spot (bounding circles apart, no raster needed), so
        # occlusion stays occasional; later tries accept partial occlusion.
        if attempt < FREE_SPOT_TRIES and any(
                math.hypot(cx - o.cx, cy - o.cy) < reach + o.r * max(OUTLINES[o.shape][2])
                for o in placed):
            continue
        theta = np.deg2rad(start + tilt + np.arange(n_vertices) * 360 / n_vertices)
        radius = r * np.resize(radii, n_vertices)
        xy = np.stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)], axis=1)
        # Round first: the stored polygon must rasterise to exactly this mask.
        polygon = tuple(np.round(xy, 2).ravel().tolist())
        mask = _rasterize(polygon, height, width)
        kept = [v & ~mask for v in visible]
        if mask.any() and all(np.count_nonzero(k) >= MIN_VISIBLE * np.count_nonzero(f)
                              for k, f in zip(kept, full)):
            new = Shape(shape, colour, size, float(cx), float(cy), float(r), polygon)
            return new, mask, kept + [mask]
    return None


def _rasterize(polygon, height, width):
    rles = mask_utils.frPyObjects([list(polygon)], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _render(rng, height, width, shapes, visible):
    """Light plain (or slightly noisy) background with each object's visible pixels painted."""
    palette = [rng.integers(200, 246, size=3)]  # label 0: background
    labels = np.zeros((height, width), np.uint8)
    for label, (shape, mask) in enumerate(zip(shapes, visible), 1):  # visible masks are disjoint
        palette.append(np.add(COLOURS[shape.colour], rng.integers(-12, 13, size=3)))
        labels[mask] = label
    image = np.stack(palette).astype(np.int16)[labels]  # (H, W, 3)
    if rng.random() < 0.5:
        image += rng.integers(-8, 9, size=image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def _annotation(rng, ann_id, image_id, shape, full, visible, rle_share):
    """COCO annotation of the visible mask: polygon if unoccluded, else RLE (both forms)."""
    height, width = visible.shape
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    occluded = np.count_nonzero(visible) < np.count_nonzero(full)
    if not occluded and rng.random() >= rle_share:
        segmentation = [list(shape.polygon)]
    elif rng.random() < UNCOMPRESSED_SHARE:
        segmentation = {"size": [height, width], "counts": _run_lengths(visible)}
    else:
        segmentation = {"size": [height, width], "counts": rle["counts"].decode("utf-8")}
    return {"id": ann_id, "image_id": image_id, "category_id": SHAPES.index(shape.shape) + 1,
            "segmentation": segmentation, "area": int(np.count_nonzero(visible)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            "color": shape.colour, "size": shape.size}


def _run_lengths(mask):
    """Uncompressed COCO RLE counts: column-major runs, starting with a run of zeros."""
    flat = mask.ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], edges, [flat.size])))
    return ([0] if flat[0] else []) + [int(c) for c in counts]


def _candidates(rng, shapes, areas, height, width, novel, is_train):
    """Every expression the image supports, by kind; train never names a novel pair."""
    index = {}  # description -> indices of the objects it matches
    for i, s in enumerate(shapes):
        for keep in itertools.product((False, True), repeat=3):
            desc = tuple(v if k else None for v, k in zip((s.size, s.colour, s.shape), keep))
            index.setdefault(desc, []).append(i)
    # Groups for relations leave size out: "the largest big circle" reads badly.
    groups = {d: m for d, m in index.items() if d[0] is None}
    tried = rng.permutation(len(ALL_DESCS))[:NO_TARGET_TRIES]
    exprs = itertools.chain(
        _attribute_exprs(index), _multi_exprs(index),
        _extreme_exprs(shapes, areas, groups, height, width),
        _anchor_exprs(shapes, index, groups, height, width), _no_target_exprs(index, novel, tried))
    cands = {kind: [] for kinds in KIND_GROUPS.values() for kind in kinds}
    for expr in exprs:
        if not (is_train and novel.intersection(expr.pairs)):
            cands[expr.kind].append(expr)
    return cands


@functools.lru_cache(maxsize=None)  # a few hundred distinct phrases, asked for ~10^6 times
def _attribute_template(desc):
    """Which attribute words a description uses: one word alone, or several."""
    size, colour, shape = desc
    if (size, colour) == (None, None):
        return "shape_only"
    if (size, shape) == (None, None):
        return "colour_only"
    if (colour, shape) == (None, None):
        return "size_only"
    return "attribute"


def _phrase(desc, plural=False):
    size, colour, shape = desc
    return " ".join(w for w in (size, colour, (shape or "shape") + "s" * plural) if w)


def _pairs(desc):
    return ((desc[1], desc[2]),) if desc[1] and desc[2] else ()


def _attribute_exprs(index):
    """'the big blue square': any description that matches exactly one object."""
    for desc, members in index.items():
        if len(members) == 1 and desc != ANY:
            p = _phrase(desc)
            phrasings = [f"the {p}", p, f"the {p} in the picture"]
            if desc[1] and desc[2]:
                phrasings.append(" ".join(filter(None, ("the", desc[0], desc[2], "that is", desc[1]))))
            yield Expr("attribute", tuple(members), tuple(phrasings), _pairs(desc), _attribute_template(desc))


def _multi_exprs(index):
    """'all red shapes', 'the two circles': any description that matches 2+ objects."""
    for desc, members in index.items():
        if len(members) >= 2:
            p, n = _phrase(desc, plural=True), len(members)
            phrasings = [f"all {p}", f"all the {p}", f"every {_phrase(desc)}",
                         f"the {NUMBER_WORDS[n]} {p}"]
            if n == 2:
                phrasings.append(f"both {p}")
            yield Expr("multi", tuple(members), tuple(phrasings), _pairs(desc))


def _extreme_exprs(shapes, areas, groups, height, width):
    """'the leftmost circle', 'the largest star': the winner must lead every rival by a
    clear margin (POSITION_MARGIN of the side; SIZE_MARGIN in radius and visible area)."""
    for desc, members in groups.items():
        if len(members) < 2:
            continue
        p = _phrase(desc)
        for axis, sign, two, many, _ in DIRECTIONS:
            coord = [sign * (s.cx if axis == "x" else s.cy) for s in shapes]
            first, second = sorted(members, key=coord.__getitem__, reverse=True)[:2]
            if coord[first] - coord[second] >= POSITION_MARGIN * (width if axis == "x" else height):
                templates = two if len(members) == 2 else many
                yield Expr("position", (first,), tuple(t.format(p=p) for t in templates), _pairs(desc))
        for sign, two, many in EXTREMES:
            winner = max(members, key=lambda i: sign * shapes[i].r)
            duels = [(winner, o) if sign > 0 else (o, winner) for o in members if o != winner]
            if all(shapes[a].r >= SIZE_MARGIN * shapes[b].r and areas[a] >= SIZE_MARGIN * areas[b]
                   for a, b in duels):  # (larger, smaller) pairs
                templates = two if len(members) == 2 else many
                yield Expr("size", (winner,), tuple(t.format(p=p) for t in templates), _pairs(desc))


def _anchor_exprs(shapes, index, groups, height, width):
    """'the circle left of the green star': the anchor is the only one of its colour and
    shape; exactly one group member lies clearly on that side, all others clearly not."""
    for anchor, s in enumerate(shapes):
        anchor_desc = (None, s.colour, s.shape)
        if len(index[anchor_desc]) != 1:
            continue
        for axis, sign, _, _, templates in DIRECTIONS:
            margin = POSITION_MARGIN * (width if axis == "x" else height)
            offset = [sign * ((o.cx - s.cx) if axis == "x" else (o.cy - s.cy)) for o in shapes]
            for desc, members in groups.items():
                hits = [i for i in members if i != anchor and offset[i] >= margin]
                if len(hits) == 1 and all(offset[i] <= -margin for i in members
                                          if i not in (anchor, hits[0])):
                    a, p = _phrase(anchor_desc), _phrase(desc)
                    phrasings = tuple(t.format(p=p, a=a) for t in templates)
                    yield Expr("anchor", tuple(hits), phrasings, _pairs(desc) + _pairs(anchor_desc))


def _no_target_exprs(index, novel, sample):
    """Descriptions that match nothing: absent attributes ('the purple star'), the same
    with a position ('the yellow square on the left'), and wrong counts ('the two stars'
    when there is one). Only a sample of all descriptions is tried: a few suffice."""
    where = [templates for _, _, _, templates, _ in DIRECTIONS]
    for k in sample:
        desc = ALL_DESCS[k]
        p, pairs = _phrase(desc), _pairs(desc)
        is_novel = bool(novel.intersection(pairs))  # its own kind, so val/test use them often
        if desc not in index:
            bare = (f"the {p}", f"the {p} in the picture")
            where_at = tuple(t.format(p=p) for t in where[k % len(where)])  # k is random already
            yield Expr("absent_novel" if is_novel else "absent", (), bare, pairs)
            yield Expr("absent_novel" if is_novel else "absent_where", (), where_at, pairs)
        if desc[0] is None and desc != ANY and len(index.get(desc, ())) < 2:
            plural = _phrase(desc, plural=True)
            yield Expr("count", (), (f"the two {plural}", f"both {plural}"), pairs)


def _choose(rng, cands, n_refs, no_target_share):
    """Pick up to n_refs expressions with 1-2 phrasings each, never reusing a sentence.

    Yields (expression, sentences). Candidates are consumed, so no two refs share one.
    """
    used = set()
    for _ in range(n_refs):
        wanted = ("none",) if rng.random() < no_target_share else ("attribute", "relation", "multi")
        groups = [g for g in wanted if any(cands[k] for k in KIND_GROUPS[g])]
        if not groups:
            continue
        kinds = [k for k in KIND_GROUPS[groups[rng.integers(len(groups))]] if cands[k]]
        pool = cands[kinds[rng.integers(len(kinds))]]
        while pool:
            expr = pool.pop(int(rng.integers(len(pool))))
            fresh = [s for s in expr.phrasings if s not in used]
            if fresh:
                n_sents = 1 + int(rng.random() < 0.5)
                picked = [fresh[i] for i in rng.permutation(len(fresh))[:n_sents]]
                used.update(picked)
                yield expr, picked
                break


def _ref(ref_id, sent_ids, image_id, split, file_name, expr, sents, shapes, ann_ids, novel):
    """One gRefCOCO ref; `novel` also flags refs whose targets carry a novel pair."""
    targets = expr.targets
    named = set(expr.pairs) | {(shapes[i].colour, shapes[i].shape) for i in targets}
    sentences = [{"sent_id": next(sent_ids), "sent": s, "raw": s[0].upper() + s[1:],
                  "tokens": s.split()} for s in sents]
    return {"ref_id": ref_id, "image_id": image_id, "split": split,
            "ann_id": [ann_ids[i] for i in targets] or [-1],
            "category_id": [SHAPES.index(shapes[i].shape) + 1 for i in targets] or [-1],
            "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
            "no_target": not targets, "file_name": file_name, "novel": bool(named & novel),
            "template": expr.template or KIND_TEMPLATES[expr.kind]}


def _dump(path, obj):
    path.write_text(json.dumps(obj, separators=(",", ":")), encoding="utf-8")
