"""gRefCOCO / RefCOCO reader: `grefs(unc).json` + COCO `instances.json` -> samples.

One sample per sentence. Its target is the union of the ref's annotation
masks, or empty for a no-target ref. Behaviour follows the official GRES
loader (SPEC §4):

- `ann_id == [-1]` (or a plain `-1`) is the canonical no-target signal; the
  `no_target` flag, when present, must agree with it.
- Inside a targeted ref, crowd annotations are skipped, and so are polygon
  parts with fewer than 3 points; an annotation left with no part is skipped
  too. A targeted ref left with no annotation at all is dropped (it would be a
  "target" whose mask is empty). Each of these is counted, never silent.
- Plain RefCOCO/RefCOCO+/RefCOCOg refs (an int `ann_id`, no `no_target` key)
  are the same shape and load the same way.

Anything structurally wrong raises `DataError` naming the file and the ref_id
or key, before any image is read. Only I/O here is reading the two JSON files.

Why one long module: it mirrors the official gRefCOCO loader's rules in one place (ref validation,
target resolution, split selection, annotation conversion), each failure naming the file and ref.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jurassiglip.data import masks

log = logging.getLogger(__name__)

NO_TARGET_ANN_ID = -1
REF_KEYS = ("ref_id", "image_id", "split", "ann_id", "sentences")
IMAGE_KEYS = ("id", "file_name", "height", "width")
ANN_KEYS = ("id", "image_id", "segmentation")


class DataError(ValueError):
    """Input data is malformed or inconsistent; the message names the file and the item."""


@dataclass(frozen=True)
class ImageInfo:
    """One image of instances.json; sizes are the original pixel sizes."""

    file_name: str
    height: int
    width: int


@dataclass(frozen=True)
class Annotation:
    """One usable (non-crowd, non-degenerate) object of instances.json."""

    image_id: int
    category_id: int
    rle: dict  # compressed RLE at original resolution, counts as str


@dataclass(frozen=True)
class Sample:
    """One referring expression (one sentence of a ref).

    ann_ids are the annotations that make up the target after crowd and
    degenerate annotations were skipped; empty for a no-target sample.
    """

    ref_id: int
    sent_id: int
    image_id: int
    split: str
    sentence: str
    no_target: bool
    ann_ids: tuple[int, ...]
    novel: bool
    template: str = ""  # the synthetic generator's template (the ref's "template" key); "" for gRefCOCO

    @property
    def kind(self) -> str:
        """"no_target", "single" or "multi" (the GRES breakdown of expressions)."""
        if self.no_target:
            return "no_target"
        return "single" if len(self.ann_ids) == 1 else "multi"


@dataclass
class RefDataset:
    """What the reader returns; plain data, ready for `manifest.build_manifest`.

    images: every image that has at least one sample, by image_id.
    samples: in file order of refs, then sentence order.
    annotations: every usable object of those images, by ann_id (targets and
        the text-blind "all objects" baseline are both built from these).
    image_objects: image_id -> ann_ids of its usable objects, in file order.
    counts: what was skipped or dropped, see `read_refs`.
    missing_splits: listed, optional splits the file has no refs of (skipped).
    """

    images: dict[int, ImageInfo]
    samples: list[Sample]
    annotations: dict[int, Annotation] = field(default_factory=dict)
    image_objects: dict[int, tuple[int, ...]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    missing_splits: list[str] = field(default_factory=list)


@dataclass
class _Ref:
    """A validated ref before filtering; ann_ids are as written in the file."""

    ref_id: int
    image_id: int
    split: str
    ann_ids: tuple[int, ...]
    no_target: bool
    sentences: list[tuple[int, str]]
    novel: bool
    template: str = ""
    targets: tuple[int, ...] = ()
    crowd_skipped: int = 0


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed JSON: {e}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _index_instances(data: Any, path: Path) -> tuple[dict[int, ImageInfo], dict[int, dict]]:
    """Check instances.json's shape and index images and annotations by id."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a COCO object with 'images' and 'annotations', got {type(data).__name__}")
    for key in ("images", "annotations"):
        if key not in data:
            raise DataError(f"{path}: missing key '{key}'")
        if not isinstance(data[key], list):
            raise DataError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    images: dict[int, ImageInfo] = {}
    for i, img in enumerate(data["images"]):
        missing = [k for k in IMAGE_KEYS if not isinstance(img, dict) or k not in img]
        if missing:
            raise DataError(f"{path}: images[{i}] is missing key '{missing[0]}'")
        if img["id"] in images:
            raise DataError(f"{path}: duplicate image id {img['id']}")
        if not (_is_int(img["height"]) and _is_int(img["width"]) and img["height"] > 0 and img["width"] > 0):
            raise DataError(f"{path}: image id {img['id']} has invalid size {img['height']}x{img['width']}")
        images[img["id"]] = ImageInfo(str(img["file_name"]), img["height"], img["width"])
    anns: dict[int, dict] = {}
    for i, ann in enumerate(data["annotations"]):
        missing = [k for k in ANN_KEYS if not isinstance(ann, dict) or k not in ann]
        if missing:
            raise DataError(f"{path}: annotations[{i}] is missing key '{missing[0]}'")
        if ann["id"] in anns:
            raise DataError(f"{path}: duplicate annotation id {ann['id']}")
        if ann["image_id"] not in images:
            raise DataError(
                f"{path}: annotation id {ann['id']} refers to image_id {ann['image_id']} absent from 'images'"
            )
        anns[ann["id"]] = ann
    return images, anns


def _parse_ann_ids(raw: Any, where: str) -> tuple[int, ...]:
    ids = tuple(raw) if isinstance(raw, list) else (raw,)
    if not ids or not all(_is_int(a) for a in ids):
        raise DataError(f"{where}: ann_id must be an int or a non-empty list of ints, got {raw!r}")
    if NO_TARGET_ANN_ID in ids and len(ids) > 1:
        raise DataError(f"{where}: ann_id mixes the no-target id -1 with real ids {list(ids)}")
    return ids


def _parse_sentences(raw: Any, where: str) -> list[tuple[int, str]]:
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: has no sentences")
    out = []
    for j, sent in enumerate(raw):
        if not isinstance(sent, dict) or "sent_id" not in sent or "sent" not in sent:
            raise DataError(f"{where}: sentences[{j}] needs 'sent_id' and 'sent'")
        if not _is_int(sent["sent_id"]):
            raise DataError(f"{where}: sentences[{j}] sent_id must be an int, got {sent['sent_id']!r}")
        text = sent["sent"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: sent_id {sent['sent_id']} has an empty sentence")
        out.append((sent["sent_id"], text.strip()))
    return out


def _parse_ref(raw: Any, index: int, path: Path, images: dict[int, ImageInfo], anns: dict[int, dict]) -> _Ref:
    """Validate one ref against instances.json; `index` is its position in the file."""
    if not isinstance(raw, dict):
        raise DataError(f"{path}: refs[{index}] must be an object, got {type(raw).__name__}")
    name = f"ref_id {raw['ref_id']}" if "ref_id" in raw else f"refs[{index}]"
    where = f"{path}: {name}"
    for key in REF_KEYS:
        if key not in raw:
            raise DataError(f"{where}: missing key '{key}'")
    for key in ("ref_id", "image_id"):
        if not _is_int(raw[key]):
            raise DataError(f"{where}: {key} must be an int, got {raw[key]!r}")
    image_id = raw["image_id"]
    if image_id not in images:
        raise DataError(f"{where}: image_id {image_id} is absent from instances.json images")
    if not isinstance(raw["split"], str):
        raise DataError(f"{where}: split must be a string, got {raw['split']!r}")
    ann_ids = _parse_ann_ids(raw["ann_id"], where)
    no_target = ann_ids == (NO_TARGET_ANN_ID,)
    if "no_target" in raw and raw["no_target"] is not None and bool(raw["no_target"]) != no_target:
        raise DataError(
            f"{where}: no_target={raw['no_target']} contradicts ann_id {raw['ann_id']} "
            f"(ann_id [-1] is the no-target signal)"
        )
    if not no_target:
        for a in ann_ids:
            if a not in anns:
                raise DataError(f"{where}: ann_id {a} is absent from instances.json annotations")
            if anns[a]["image_id"] != image_id:
                raise DataError(
                    f"{where}: ann_id {a} belongs to image_id {anns[a]['image_id']}, "
                    f"not to the ref's image_id {image_id}"
                )
    novel = raw.get("novel", False)
    if not isinstance(novel, bool):
        raise DataError(f"{where}: novel must be true/false, got {novel!r}")
    template = raw.get("template", "")
    if not isinstance(template, str):
        raise DataError(f"{where}: template must be a string, got {template!r}")
    return _Ref(
        ref_id=raw["ref_id"],
        image_id=image_id,
        split=raw["split"],
        ann_ids=ann_ids,
        no_target=no_target,
        sentences=_parse_sentences(raw["sentences"], where),
        novel=novel,
        template=template,
    )


def _parse_refs(data: Any, path: Path, images: dict[int, ImageInfo], anns: dict[int, dict]) -> list[_Ref]:
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of refs, got {type(data).__name__}")
    refs, seen = [], set()
    for i, raw in enumerate(data):
        ref = _parse_ref(raw, i, path, images, anns)
        if ref.ref_id in seen:
            raise DataError(f"{path}: duplicate ref_id {ref.ref_id}")
        seen.add(ref.ref_id)
        refs.append(ref)
    return refs


def _has_usable_segmentation(ann: dict) -> bool:
    """False when a polygon annotation has no part with >= 3 points (cheap, no decoding)."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        try:
            return bool(masks.split_polygon_parts(seg)[0])
        except ValueError:
            return True  # malformed: let the conversion report it with the ann id
    return True


def _resolve_targets(ref: _Ref, anns: dict[int, dict]) -> None:
    """Fill ref.targets with the annotations GRES keeps: no crowd, some polygon area."""
    if ref.no_target:
        return
    kept = []
    for a in ref.ann_ids:
        if anns[a].get("iscrowd", 0):
            ref.crowd_skipped += 1
        elif _has_usable_segmentation(anns[a]):
            kept.append(a)
    ref.targets = tuple(dict.fromkeys(kept))  # a repeated id is still one object


def _check_splits(refs: list[_Ref], splits: list[str], required: Collection[str], path: Path,
                  stage: str) -> list[str]:
    """The listed splits without refs; an error for a required one."""
    present = Counter(r.split for r in refs)
    missing = []
    for split in splits:
        if present[split] == 0:
            existing = ", ".join(sorted(present)) or "none"
            if split in required:
                raise DataError(f"{path}: split '{split}' has no refs {stage}; splits present: {existing}")
            log.warning("%s: split '%s' has no refs %s (splits present: %s); it is skipped", path, split, stage,
                        existing)
            missing.append(split)
    return missing


def _select(refs: list[_Ref], splits: list[str], required: Collection[str], max_refs: int, drop_no_target: bool,
            path: Path, counts: Counter) -> tuple[list[_Ref], list[str]]:
    """Filter refs in file order: listed splits, usable targets, no-target drop, per-split cap.

    Returns the kept refs and the listed splits left without any.
    """
    missing = _check_splits(refs, splits, required, path, "in the file")
    wanted = set(splits)
    in_splits = [r for r in refs if r.split in wanted]
    counts["refs_other_splits"] = len(refs) - len(in_splits)
    kept = []
    for r in in_splits:
        if not r.no_target and not r.targets:
            counts["refs_without_valid_target"] += 1
        elif r.no_target and drop_no_target:
            counts["refs_no_target_dropped"] += 1
        else:
            kept.append(r)
    present = [s for s in splits if s not in missing]
    missing += _check_splits(kept, present, required, path, "left after dropping no-target / target-less refs")
    if max_refs > 0:
        per_split: Counter = Counter()
        capped = []
        for r in kept:
            per_split[r.split] += 1
            if per_split[r.split] <= max_refs:
                capped.append(r)
        counts["refs_capped"] = len(kept) - len(capped)
        kept = capped
    return kept, missing


def _convert_annotations(
    image_ids: list[int], images: dict[int, ImageInfo], anns: dict[int, dict], path: Path, counts: Counter
) -> tuple[dict[int, Annotation], dict[int, tuple[int, ...]]]:
    """Turn every object of the used images into one RLE; crowd and empty ones are left out."""
    by_image: dict[int, list[dict]] = defaultdict(list)
    wanted = set(image_ids)
    for ann in anns.values():
        if ann["image_id"] in wanted:
            by_image[ann["image_id"]].append(ann)
    converted: dict[int, Annotation] = {}
    objects: dict[int, tuple[int, ...]] = {}
    for image_id in image_ids:
        info = images[image_id]
        ids = []
        for ann in by_image[image_id]:
            if ann.get("iscrowd", 0):
                counts["crowd_anns_in_images"] += 1
                continue
            try:
                result = masks.ann_to_rle(ann["segmentation"], info.height, info.width)
            except (ValueError, TypeError, KeyError) as e:
                raise DataError(f"{path}: annotation id {ann['id']} (image_id {image_id}): {e}") from None
            counts["degenerate_polygon_parts"] += result.dropped_parts
            if result.rle is None:
                counts["anns_without_valid_segmentation"] += 1
                continue
            converted[ann["id"]] = Annotation(image_id, int(ann.get("category_id", -1)), result.rle)
            ids.append(ann["id"])
        objects[image_id] = tuple(ids)
    return converted, objects


def read_refs(
    grefs_path: Path | str,
    instances_path: Path | str,
    *,
    splits: list[str],
    max_refs_per_split: int,
    drop_no_target: bool,
    required_splits: Collection[str] | None = None,
) -> RefDataset:
    """Read a gRefCOCO/RefCOCO refs file and its COCO instances into samples.

    Args:
        grefs_path: JSON list of refs (`grefs(unc).json`, or a RefCOCO refs file as JSON).
        instances_path: COCO instances JSON with 'images' and 'annotations'.
        splits: splits to keep.
        required_splits: those of `splits` that must have refs (default: all); a
            missing other one is logged and skipped (the first gRefCOCO release
            has no testA/testB refs) and listed in `missing_splits`.
        max_refs_per_split: keep the first N refs of each split in file order; 0 keeps all.
        drop_no_target: drop no-target refs (the prototype notebook did).

    Returns:
        RefDataset. counts holds: refs_total, refs_other_splits,
        refs_without_valid_target, refs_no_target_dropped, refs_capped,
        crowd_anns_skipped (crowd ids inside kept targeted refs),
        crowd_anns_in_images (crowd objects of kept images, also left out of
        the all-objects mask), degenerate_polygon_parts,
        anns_without_valid_segmentation (both over the objects of kept images).

    Raises:
        DataError: malformed or inconsistent input, naming the file and ref_id / key.
    """
    grefs_path, instances_path = Path(grefs_path), Path(instances_path)
    log.info("reading %s and %s", grefs_path, instances_path)
    instances = _load_json(instances_path)
    images, anns = _index_instances(instances, instances_path)
    refs = _parse_refs(_load_json(grefs_path), grefs_path, images, anns)
    for ref in refs:
        _resolve_targets(ref, anns)

    counts: Counter = Counter(refs_total=len(refs))
    required = set(splits) if required_splits is None else set(required_splits)
    kept, missing = _select(refs, splits, required, max_refs_per_split, drop_no_target, grefs_path, counts)
    counts["crowd_anns_skipped"] = sum(r.crowd_skipped for r in kept)

    samples = [
        Sample(r.ref_id, sent_id, r.image_id, r.split, text, r.no_target, r.targets, r.novel, r.template)
        for r in kept
        for sent_id, text in r.sentences
    ]
    image_ids = list(dict.fromkeys(r.image_id for r in kept))  # first-use order, deterministic
    converted, objects = _convert_annotations(image_ids, images, anns, instances_path, counts)
    log.info(
        "kept %d refs -> %d samples over %d images (splits %s)", len(kept), len(samples), len(image_ids), splits
    )
    keys = ("refs_total", "refs_other_splits", "refs_without_valid_target", "refs_no_target_dropped",
            "refs_capped", "crowd_anns_skipped", "crowd_anns_in_images", "degenerate_polygon_parts",
            "anns_without_valid_segmentation")
    return RefDataset(
        images={i: images[i] for i in image_ids},
        samples=samples,
        annotations=converted,
        image_objects=objects,
        counts={k: int(counts[k]) for k in keys},
        missing_splits=missing,
    )
