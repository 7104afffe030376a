"""Property tests (hypothesis): metric invariants, mask round trips through pycocotools, valid synthetic refs.

tests/test_metrics.py and tests/data/test_masks.py hold the first properties
on small fixed shapes; these widen them to random batches, sizes, polygons
and whole generated datasets. Example counts stay modest so the file runs in
seconds; deadline=None because the first example pays for imports.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from coco_rle import uncompressed_counts
from pycocotools import mask as coco_mask

from jurassiglip.data import masks
from jurassiglip.data.refs import read_refs
from jurassiglip.data.synthetic import COLOURS, SHAPES, generate
from jurassiglip.inference.metrics import DEFAULT_THRESHOLDS, batch_intersection_union, sample_iou, summarize

RATIOS = ["cIoU", "gIoU", *(f"Pr_{x:g}" for x in DEFAULT_THRESHOLDS), "N_acc", "T_acc"]


@st.composite
def batches(draw, max_b=8, max_side=12):
    """(pred, gt, pred_nt, gt_nt): B random mask pairs; a no-target sample has an empty gt."""
    b = draw(st.integers(1, max_b))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    pred = draw(arrays(bool, (b, h, w)))
    gt = draw(arrays(bool, (b, h, w)))
    gt_nt = np.array(draw(st.lists(st.booleans(), min_size=b, max_size=b)))
    pred_nt = np.array(draw(st.lists(st.booleans(), min_size=b, max_size=b)))
    gt[gt_nt] = False
    return pred, gt, pred_nt, gt_nt


# -- metrics -----------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(batches())
def test_every_ratio_lies_in_0_1_and_iou_too(batch):
    pred, gt, pred_nt, gt_nt = batch
    i, u = batch_intersection_union(pred, gt, pred_nt, gt_nt)
    iou = sample_iou(i, u, gt_nt, pred_nt)
    assert ((0 <= iou) & (iou <= 1)).all() and (i <= u).all()
    out = summarize(i, u, gt_nt, pred_nt)
    assert all(0.0 <= out[k] <= 1.0 for k in RATIOS)
    assert out["n_samples"] == len(pred) and out["n_no_target"] == int(gt_nt.sum())


@settings(max_examples=50, deadline=None)
@given(batches(), st.randoms(use_true_random=False))
def test_summary_does_not_depend_on_sample_order(batch, rnd):
    pred, gt, pred_nt, gt_nt = batch
    order = list(range(len(pred)))
    rnd.shuffle(order)
    i, u = batch_intersection_union(pred, gt, pred_nt, gt_nt)
    j, v = batch_intersection_union(pred[order], gt[order], pred_nt[order], gt_nt[order])
    a, b = summarize(i, u, gt_nt, pred_nt), summarize(j, v, gt_nt[order], pred_nt[order])
    assert a.keys() == b.keys() and all(np.isclose(a[k], b[k], rtol=0, atol=1e-12) for k in a)


@settings(max_examples=50, deadline=None)
@given(batches())
def test_precision_falls_as_the_threshold_rises(batch):
    pred, gt, pred_nt, gt_nt = batch
    out = summarize(*batch_intersection_union(pred, gt, pred_nt, gt_nt), gt_nt, pred_nt,
                    thresholds=(0.1, 0.3, 0.5, 0.7, 0.9, 1.0))
    values = [out[f"Pr_{x:g}"] for x in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)]
    assert values == sorted(values, reverse=True)


@settings(max_examples=50, deadline=None)
@given(batches())
def test_perfect_prediction_has_ciou_and_giou_one(batch):
    _, gt, _, gt_nt = batch
    gt[~gt_nt, 0, 0] = True  # a targeted expression always has some pixels
    out = summarize(*batch_intersection_union(gt, gt, gt_nt, gt_nt), gt_nt, gt_nt)
    assert out["gIoU"] == 1.0
    assert out["cIoU"] == (1.0 if (~gt_nt).any() else 0.0)  # cIoU is 0/0 -> 0 on an all-no-target split


@settings(max_examples=50, deadline=None)
@given(batches())
def test_swapping_prediction_and_truth_keeps_each_iou(batch):
    pred, gt, _, _ = batch
    targets = np.zeros(len(pred), dtype=bool)
    i, u = batch_intersection_union(torch.from_numpy(pred), torch.from_numpy(gt), targets, targets)
    j, v = batch_intersection_union(gt, pred, targets, targets)
    np.testing.assert_array_equal(sample_iou(i, u, targets, targets), sample_iou(j, v, targets, targets))


# -- masks: RLE and polygons through pycocotools ------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64).flatmap(lambda h: st.integers(1, 64).flatmap(lambda w: arrays(bool, (h, w)))))
def test_compressed_rle_round_trips_as_str_and_bytes(mask):
    h, w = mask.shape
    rle = masks.encode(mask)
    np.testing.assert_array_equal(masks.decode(rle), mask)
    as_bytes = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}  # as pycocotools writes it
    assert masks.ann_to_rle(as_bytes, h, w).rle == rle


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40).flatmap(lambda h: st.integers(1, 40).flatmap(lambda w: arrays(bool, (h, w)))))
def test_uncompressed_counts_give_back_the_mask(mask):
    h, w = mask.shape
    converted = masks.ann_to_rle({"size": [h, w], "counts": uncompressed_counts(mask)}, h, w)
    np.testing.assert_array_equal(masks.decode(converted.rle), mask)


@st.composite
def polygons(draw):
    """An image size and 1-3 polygon parts inside it (3-8 points each), plus 0-2 degenerate parts."""
    h, w = draw(st.integers(4, 60)), draw(st.integers(4, 60))
    coord = st.tuples(st.floats(0, w, allow_nan=False), st.floats(0, h, allow_nan=False))
    parts = [[v for point in draw(st.lists(coord, min_size=3, max_size=8)) for v in point]
             for _ in range(draw(st.integers(1, 3)))]
    degenerate = [[v for point in draw(st.lists(coord, min_size=1, max_size=2)) for v in point]
                  for _ in range(draw(st.integers(0, 2)))]
    return h, w, parts, degenerate


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(polygons())
def test_polygons_become_the_union_of_their_parts_and_round_trip(case):
    h, w, parts, degenerate = case
    converted = masks.ann_to_rle(parts + degenerate, h, w)
    assert converted.dropped_parts == len(degenerate)
    mask = masks.decode(converted.rle)
    each = [coco_mask.decode(coco_mask.frPyObjects([p], h, w)).astype(bool)[..., 0] for p in parts]
    np.testing.assert_array_equal(mask, np.logical_or.reduce(each))
    assert masks.encode(mask) == converted.rle  # decode -> encode gives the same canonical counts
    assert masks.ann_to_rle(json.loads(json.dumps(converted.rle)), h, w).rle == converted.rle  # survives JSON


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30).flatmap(lambda s: arrays(bool, st.tuples(st.integers(0, 4), st.just(s), st.just(s)))))
def test_union_of_rles_is_the_pixelwise_or(stack):
    n, h, w = stack.shape
    union = masks.union([masks.encode(m) for m in stack], h, w)
    np.testing.assert_array_equal(union, stack.any(axis=0) if n else np.zeros((h, w), bool))


# -- the synthetic generator always writes valid gRefCOCO ---------------------------------------


@st.composite
def synthetic_configs(draw):
    min_objects = draw(st.integers(1, 4))
    min_side = draw(st.integers(32, 64))
    pairs = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    return dict(
        seed=draw(st.integers(0, 2**32 - 1)),
        n_images={"train": draw(st.integers(1, 3)), "val": draw(st.integers(1, 2))},
        min_objects=min_objects,
        max_objects=draw(st.integers(min_objects, 6)),
        min_side=min_side,
        max_side=draw(st.integers(min_side, 80)),
        refs_per_image=draw(st.integers(1, 6)),
        no_target_share=draw(st.sampled_from([0.0, 0.2, 0.5, 0.9])),
        novel_combos=draw(st.lists(st.sampled_from(pairs), max_size=4, unique=True)),
        rle_share=draw(st.sampled_from([0.0, 0.3, 1.0])),
    )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(synthetic_configs())
def test_generated_refs_are_valid_grefcoco(tmp_path, config):
    files = generate(tmp_path / "shapes", **config)
    refs = json.loads(files.grefs_path.read_text())
    instances = json.loads(files.instances_path.read_text())
    images = {i["id"]: i for i in instances["images"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    assert len(images) == sum(config["n_images"].values())
    for ref in refs:
        assert ref["image_id"] in images and ref["split"] in config["n_images"]
        if ref["no_target"]:
            assert ref["ann_id"] == [-1] and ref["category_id"] == [-1]
        else:
            assert ref["ann_id"] and all(a in anns and anns[a]["image_id"] == ref["image_id"] for a in ref["ann_id"])
        assert ref["sentences"]
        for sent in ref["sentences"]:
            assert sent["sent"].strip() and sent["raw"].strip() and sent["tokens"]
    for ann in anns.values():
        h, w = images[ann["image_id"]]["height"], images[ann["image_id"]]["width"]
        assert masks.ann_to_rle(ann["segmentation"], h, w).rle is not None
    # and the project's own reader takes it as it is
    dataset = read_refs(files.grefs_path, files.instances_path, splits=list(config["n_images"]),
                        max_refs_per_split=0, drop_no_target=False)
    assert len(dataset.samples) == sum(len(r["sentences"]) for r in refs)
