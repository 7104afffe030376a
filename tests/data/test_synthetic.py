"""synthetic.generate: determinism, gRefCOCO/COCO validity, masks, novel pairs, expressions."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from jurassiglip.data.synthetic import COLOURS, SHAPES, SIZE_RANGES, SyntheticFiles, generate

NOVEL = ["red triangle", "blue square", "green circle", "yellow star"]
NOVEL_PAIRS = {tuple(c.split()) for c in NOVEL}
SMALL = {"train": 20, "val": 8, "test": 8}


def _generate(out: Path, seed: int = 0, **overrides) -> SyntheticFiles:
    kwargs = dict(seed=seed, n_images=SMALL, min_objects=2, max_objects=6, min_side=96,
                  max_side=224, refs_per_image=6, no_target_share=0.12, novel_combos=NOVEL,
                  rle_share=0.3)
    kwargs.update(overrides)
    return generate(out, **kwargs)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


class Data:
    """The generated JSON, indexed the way the tests ask questions of it."""

    def __init__(self, files: SyntheticFiles):
        self.files = files
        self.refs = json.loads(files.grefs_path.read_text())
        self.instances = json.loads(files.instances_path.read_text())
        self.images = {i["id"]: i for i in self.instances["images"]}
        self.anns = {a["id"]: a for a in self.instances["annotations"]}
        self.shape_of = {c["id"]: c["name"] for c in self.instances["categories"]}

    def objects(self, image_id: int) -> list[dict]:
        return [a for a in self.instances["annotations"] if a["image_id"] == image_id]

    def pair(self, ann: dict) -> tuple[str, str]:
        return ann["color"], self.shape_of[ann["category_id"]]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    return Data(_generate(tmp_path_factory.mktemp("synthetic") / "shapes"))


def test_same_seed_is_byte_identical_other_seed_differs_and_rerun_replaces(tmp_path):
    a = _generate(tmp_path / "a", seed=3)
    b = tmp_path / "b"
    b.mkdir()
    (b / "stale.txt").write_text("left over from an older run")
    _generate(b, seed=3)
    _generate(tmp_path / "c", seed=4)

    assert _hashes(a.grefs_path.parent) == _hashes(b)  # also: stale.txt is gone
    assert _hashes(tmp_path / "c") != _hashes(b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp folders left


def test_returned_paths_point_at_the_files(data):
    assert data.files.grefs_path.name == "grefs(unc).json"
    assert data.files.instances_path.name == "instances.json"
    assert len(list(data.files.images_dir.glob("COCO_train2014_*.jpg"))) == sum(SMALL.values())


def test_every_ref_is_valid_grefcoco(data):
    ref_ids = [r["ref_id"] for r in data.refs]
    sent_ids = [s["sent_id"] for r in data.refs for s in r["sentences"]]
    assert len(set(ref_ids)) == len(ref_ids) and len(set(sent_ids)) == len(sent_ids)
    sentences_per_image = Counter()
    for ref in data.refs:
        image = data.images[ref["image_id"]]
        assert ref["file_name"] == image["file_name"]
        assert ref["split"] in SMALL
        if ref["no_target"]:
            assert ref["ann_id"] == [-1] and ref["category_id"] == [-1]
        else:
            assert ref["ann_id"] and -1 not in ref["ann_id"]
            anns = [data.anns[i] for i in ref["ann_id"]]
            assert all(a["image_id"] == ref["image_id"] for a in anns)
            assert ref["category_id"] == [a["category_id"] for a in anns]
        assert 1 <= len(ref["sentences"]) <= 2
        for sent in ref["sentences"]:
            assert sent["sent"] and sent["sent"] == sent["sent"].lower()
            assert sent["tokens"] == sent["sent"].split()
            assert sent["raw"].lower() == sent["sent"]
            sentences_per_image[(ref["image_id"], sent["sent"])] += 1
    assert max(sentences_per_image.values()) == 1  # no sentence twice within an image


def test_splits_are_disjoint_and_in_key_order(data):
    split_of_image = {}
    for ref in data.refs:
        assert split_of_image.setdefault(ref["image_id"], ref["split"]) == ref["split"]
    order = [split_of_image[i] for i in sorted(split_of_image)]
    assert order == sorted(order, key=list(SMALL).index)
    assert Counter(split_of_image.values()) == Counter(SMALL)  # every image has refs here


def test_masks_decode_with_pycocotools_to_stated_area_and_bbox(data):
    forms = Counter()
    for ann in data.instances["annotations"]:
        image = data.images[ann["image_id"]]
        h, w = image["height"], image["width"]
        seg = ann["segmentation"]
        if isinstance(seg, list):
            forms["polygon"] += 1
            assert all(len(part) >= 6 and len(part) % 2 == 0 for part in seg)
            if data.shape_of[ann["category_id"]] == "circle":
                assert len(seg[0]) // 2 >= 24
            rle = coco_mask.merge(coco_mask.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):
            forms["uncompressed"] += 1
            assert seg["size"] == [h, w] and sum(seg["counts"]) == h * w
            rle = coco_mask.frPyObjects(seg, h, w)
        else:
            forms["compressed"] += 1
            rle = {"size": seg["size"], "counts": seg["counts"].encode("utf-8")}
        mask = coco_mask.decode(rle)
        assert mask.shape == (h, w)
        assert int(mask.sum()) == ann["area"] > 0
        assert ann["bbox"] == pytest.approx(coco_mask.toBbox(rle).tolist())
        assert ann["iscrowd"] == 0 and ann["size"] in SIZE_RANGES and ann["color"] in COLOURS
    assert set(forms) == {"polygon", "uncompressed", "compressed"}


def test_visible_masks_of_one_image_do_not_overlap(data):
    for image_id, image in data.images.items():
        total = np.zeros((image["height"], image["width"]), np.int32)
        for ann in data.objects(image_id):
            seg = ann["segmentation"]
            h, w = image["height"], image["width"]
            if isinstance(seg, list):
                rle = coco_mask.merge(coco_mask.frPyObjects(seg, h, w))
            elif isinstance(seg["counts"], list):
                rle = coco_mask.frPyObjects(seg, h, w)
            else:
                rle = {"size": seg["size"], "counts": seg["counts"].encode()}
            total += coco_mask.decode(rle)
        assert total.max() <= 1


def _names_novel_pair(sentence: str) -> bool:
    return any(f"{c} {s}" in sentence or f"{s} that is {c}" in sentence for c, s in NOVEL_PAIRS)


def test_novel_pairs_never_in_train_and_present_in_val_test(data):
    split_of_image = {r["image_id"]: r["split"] for r in data.refs}
    novel_objects = Counter(split_of_image[a["image_id"]] for a in data.instances["annotations"]
                            if data.pair(a) in NOVEL_PAIRS)
    assert novel_objects["train"] == 0
    assert novel_objects["val"] > 0 and novel_objects["test"] > 0
    for ref in data.refs:
        targets = [] if ref["no_target"] else [data.anns[i] for i in ref["ann_id"]]
        expected = (any(data.pair(a) in NOVEL_PAIRS for a in targets)
                    or any(_names_novel_pair(s["sent"]) for s in ref["sentences"]))
        assert ref["novel"] == expected, ref
    flagged = Counter(r["split"] for r in data.refs if r["novel"])
    assert flagged["train"] == 0 and flagged["val"] > 0 and flagged["test"] > 0


def test_images_are_rgb_jpegs_of_stated_and_varied_sizes(data):
    sizes = set()
    for image in data.images.values():
        with Image.open(data.files.images_dir / image["file_name"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (image["width"], image["height"])
        assert image["file_name"] == f"COCO_train2014_{image['id']:012d}.jpg"
        assert 96 <= image["width"] <= 224 and 96 <= image["height"] <= 224
        sizes.add((image["width"], image["height"]))
    assert len({w for w, _ in sizes}) > 1 and len({h for _, h in sizes}) > 1
    assert any(w != h for w, h in sizes)


def test_multi_target_refs_exist(data):
    multi = [r for r in data.refs if len(r["ann_id"]) >= 2]
    assert multi and all(not r["no_target"] for r in multi)


def test_no_target_share_is_near_the_param(tmp_path):
    refs = json.loads(_generate(tmp_path / "medium", seed=1, no_target_share=0.2,
                                n_images={"train": 150, "val": 25, "test": 25}).grefs_path.read_text())
    share = sum(r["no_target"] for r in refs) / len(refs)
    assert 0.15 <= share <= 0.25
    assert len(refs) >= 0.9 * 200 * 6  # nearly every slot finds an expression


ATTRIBUTE = re.compile(  # "the big blue square", "red circle", "the small shape in the picture"
    rf"(?:the )?(?:(?P<size>{'|'.join(SIZE_RANGES)}) )?(?:(?P<colour>{'|'.join(COLOURS)}) )?"
    rf"(?P<shape>{'|'.join(SHAPES)}|shape)(?: in the picture)?")
ATTRIBUTE_THAT_IS = re.compile(  # "the big circle that is red"
    rf"the (?:(?P<size>{'|'.join(SIZE_RANGES)}) )?(?P<shape>{'|'.join(SHAPES)}) that is "
    rf"(?P<colour>{'|'.join(COLOURS)})")
EVERY = re.compile(  # "all the big red shapes", "every circle"
    rf"(?:all |all the |every )(?:(?P<size>{'|'.join(SIZE_RANGES)}) )?"
    rf"(?:(?P<colour>{'|'.join(COLOURS)}) )?(?P<shape>{'|'.join(SHAPES)}|shape)s?")


def _matching(data: Data, image_id: int, match: re.Match) -> set[int]:
    want = match.groupdict()
    return {a["id"] for a in data.objects(image_id)
            if want["size"] in (None, a["size"]) and want["colour"] in (None, a["color"])
            and want["shape"] in ("shape", data.shape_of[a["category_id"]])}


def test_attribute_and_every_expressions_match_their_targets_exactly(data):
    checked = Counter()
    for ref in data.refs:
        targets = set() if ref["no_target"] else set(ref["ann_id"])
        for sent in ref["sentences"]:
            singular = ATTRIBUTE.fullmatch(sent["sent"]) or ATTRIBUTE_THAT_IS.fullmatch(sent["sent"])
            match = singular or EVERY.fullmatch(sent["sent"])
            if match is None:
                continue
            assert _matching(data, ref["image_id"], match) == targets, sent["sent"]
            assert len(targets) <= 1 if singular else len(targets) != 1, sent["sent"]
            checked["none" if not targets else "one" if len(targets) == 1 else "many"] += 1
    assert checked["one"] > 10 and checked["many"] > 5 and checked["none"] > 0


def test_bad_arguments_raise_and_leave_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="pink triangle"):
        _generate(tmp_path / "x", novel_combos=["pink triangle"])
    with pytest.raises(ValueError, match="min_objects"):
        _generate(tmp_path / "x", min_objects=5, max_objects=3)
    assert list(tmp_path.iterdir()) == []
