"""refs.read_refs on the tiny gRefCOCO fixture: targets, filters, counts and every bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest

from jurassiglip.data import masks
from jurassiglip.data.refs import DataError, read_refs

SPLITS = ["train", "val", "testA", "testB"]


def _read(data, splits=SPLITS, max_refs=0, drop_no_target=False, required_splits=None):
    return read_refs(data.grefs_path, data.instances_path, splits=splits,
                     max_refs_per_split=max_refs, drop_no_target=drop_no_target, required_splits=required_splits)


def _target(ds, sample):
    info = ds.images[sample.image_id]
    return masks.union([ds.annotations[a].rle for a in sample.ann_ids], info.height, info.width)


def test_targets_equal_pycocotools_union(tiny, reference_union):
    ds = _read(tiny)
    for s in ds.samples:
        info = ds.images[s.image_id]
        raw_ids = tiny.ref(s.ref_id)["ann_id"]
        expected = reference_union(tiny, [] if raw_ids == [-1] else raw_ids, info.height, info.width)
        np.testing.assert_array_equal(_target(ds, s), expected, err_msg=f"ref {s.ref_id}")
        assert s.no_target == (not expected.any())


def test_one_sample_per_sentence_with_fields(tiny):
    ds = _read(tiny)
    assert [(s.ref_id, s.sent_id) for s in ds.samples] == [
        (1, 10), (1, 11), (2, 20), (3, 30), (4, 40), (5, 50), (5, 51), (6, 60), (7, 70), (8, 80), (9, 90), (10, 100)
    ]
    by_ref = {s.ref_id: s for s in ds.samples}
    assert by_ref[2].ann_ids == (101, 102)  # crowd 103 skipped
    assert by_ref[3].no_target and by_ref[3].ann_ids == () and by_ref[3].kind == "no_target"
    assert by_ref[1].kind == "single" and by_ref[4].kind == "multi"
    assert by_ref[5].novel and not by_ref[1].novel
    assert ds.samples[0].sentence == "the box on the left" and by_ref[5].split == "val"
    assert ds.images[1].file_name == "rgb.jpg" and (ds.images[1].height, ds.images[1].width) == (30, 40)


def test_counts_and_objects(tiny):
    ds = _read(tiny)
    assert ds.counts == {
        "refs_total": 11, "refs_other_splits": 1, "refs_without_valid_target": 0, "refs_no_target_dropped": 0,
        "refs_capped": 0, "crowd_anns_skipped": 1, "crowd_anns_in_images": 1,
        "degenerate_polygon_parts": 2, "anns_without_valid_segmentation": 1,
    }
    assert ds.image_objects[1] == (101, 102)  # no crowd 103, no degenerate 104
    assert 103 not in ds.annotations and 104 not in ds.annotations


def test_splits_are_filtered(tiny):
    ds = _read(tiny, splits=["val"])
    assert {s.split for s in ds.samples} == {"val"}
    assert set(ds.images) == {3, 4}
    assert ds.counts["refs_other_splits"] == 8
    assert ds.counts["crowd_anns_skipped"] == 0  # the crowd ref is in train


def test_cap_keeps_first_refs_in_file_order(tiny):
    ds = _read(tiny, max_refs=2)
    train_refs = list(dict.fromkeys(s.ref_id for s in ds.samples if s.split == "train"))
    assert train_refs == [1, 2]
    assert ds.counts["refs_capped"] == 3  # refs 3, 4 of train and ref 7 of val
    assert _read(tiny, max_refs=2).samples == ds.samples  # deterministic


def test_drop_no_target_then_cap(tiny):
    ds = _read(tiny, max_refs=3, drop_no_target=True)
    assert not any(s.no_target for s in ds.samples)
    assert list(dict.fromkeys(s.ref_id for s in ds.samples if s.split == "train")) == [1, 2, 4]
    assert ds.counts["refs_no_target_dropped"] == 3


def test_ref_with_only_crowd_target_is_dropped_and_counted(tiny):
    tiny.ref(1)["ann_id"] = [103]
    ds = _read(tiny.write())
    assert 1 not in {s.ref_id for s in ds.samples}
    assert ds.counts["refs_without_valid_target"] == 1


def test_plain_refcoco_refs_load(tiny, reference_union):
    for ref in tiny.refs:
        del ref["no_target"]
        if ref["ann_id"] != [-1]:
            ref["ann_id"], ref["category_id"] = ref["ann_id"][0], 1
        else:
            ref["ann_id"], ref["category_id"] = -1, -1
    ds = _read(tiny.write())
    by_ref = {s.ref_id: s for s in ds.samples}
    assert by_ref[4].ann_ids == (201,) and by_ref[4].kind == "single"
    assert by_ref[3].no_target
    np.testing.assert_array_equal(_target(ds, by_ref[4]), reference_union(tiny, [201], 36, 24))


def _set(path_in_refs, value):
    def mutate(data):
        ref_id, key = path_in_refs
        data.ref(ref_id)[key] = value
    return mutate


def _delete(ref_id, key):
    def mutate(data):
        del data.ref(ref_id)[key]
    return mutate


def _instances_without(key):
    def mutate(data):
        del data.instances[key]
    return mutate


def _refs_as_dict(data):
    data.refs = {"refs": data.refs}


def _empty_sentence(data):
    data.ref(5)["sentences"][1]["sent"] = "   "


BAD_INPUTS = [
    ("ann_absent", _set((4, "ann_id"), [201, 999]), "grefs", ["ref_id 4", "ann_id 999", "absent"]),
    ("ann_other_image", _set((1, "ann_id"), [201]), "grefs", ["ref_id 1", "ann_id 201", "image_id 2"]),
    ("no_sentences", _set((5, "sentences"), []), "grefs", ["ref_id 5", "no sentences"]),
    ("empty_sentence", _empty_sentence, "grefs", ["ref_id 5", "sent_id 51", "empty sentence"]),
    ("image_absent", _set((8, "image_id"), 77), "grefs", ["ref_id 8", "image_id 77"]),
    ("flag_true_with_target", _set((1, "no_target"), True), "grefs", ["ref_id 1", "contradicts"]),
    ("flag_false_without_target", _set((3, "no_target"), False), "grefs", ["ref_id 3", "contradicts"]),
    ("ref_missing_key", _delete(7, "image_id"), "grefs", ["ref_id 7", "missing key 'image_id'"]),
    ("refs_not_a_list", _refs_as_dict, "grefs", ["expected a JSON list", "dict"]),
    ("instances_missing_key", _instances_without("annotations"), "instances", ["missing key 'annotations'"]),
]


@pytest.mark.parametrize("mutate, which, fragments", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_data_error_naming_file_and_item(tiny, mutate, which, fragments):
    mutate(tiny)
    tiny.write()
    path = tiny.grefs_path if which == "grefs" else tiny.instances_path
    with pytest.raises(DataError) as err:
        _read(tiny)
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("which", ["grefs", "instances"])
def test_malformed_json_names_the_file(tiny, which):
    path = tiny.grefs_path if which == "grefs" else tiny.instances_path
    path.write_text('[{"ref_id": 1,')
    with pytest.raises(DataError, match=re.escape(str(path)) + ": malformed JSON"):
        _read(tiny)


def test_listed_split_without_refs_names_it_and_the_existing_ones(tiny):
    with pytest.raises(DataError, match=r"split 'test' has no refs.*other, testA, testB, train, val"):
        _read(tiny, splits=["train", "test"])


def test_an_optional_split_the_file_lacks_is_skipped_and_listed(tiny, caplog):
    # the first gRefCOCO release: testA/testB listed but absent; train/val required and present
    dataset = _read(tiny, splits=["train", "val", "test"], required_splits=["train", "val"])
    assert dataset.missing_splits == ["test"]
    assert {s.split for s in dataset.samples} == {"train", "val"}
    assert "split 'test' has no refs in the file" in caplog.text


def test_a_required_split_the_file_lacks_is_still_an_error(tiny):
    with pytest.raises(DataError, match=r"split 'test' has no refs"):
        _read(tiny, splits=["train", "test"], required_splits=["train", "test"])
