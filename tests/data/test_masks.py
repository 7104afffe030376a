"""masks.py against pycocotools itself, plus round-trip properties."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as coco_mask

from jurassiglip.data import masks


def _coco_poly(parts, h, w):
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(parts, h, w))).astype(bool)


def test_polygon_matches_pycocotools_and_drops_degenerate_parts():
    parts = [[1, 1, 9, 1, 9, 6], [10, 2, 14, 2, 14, 8, 10, 8]]
    result = masks.ann_to_rle(parts + [[0, 0, 3, 3], [1, 2, 3, 4, 5]], 10, 16)
    assert result.dropped_parts == 2  # 2 points; odd length
    assert isinstance(result.rle["counts"], str)
    np.testing.assert_array_equal(masks.decode(result.rle), _coco_poly(parts, 10, 16))


def test_polygon_with_no_usable_part_gives_none():
    assert masks.ann_to_rle([[1, 1, 5, 5]], 8, 8) == masks.Converted(None, 1)


def test_uncompressed_and_compressed_rle():
    m = np.zeros((7, 5), dtype=bool)
    m[2:5, 1:4] = True
    compressed = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
    uncompressed = {"size": [7, 5], "counts": [9, 3, 4, 3, 4, 3, 9]}
    np.testing.assert_array_equal(coco_mask.decode(coco_mask.frPyObjects(uncompressed, 7, 5)).astype(bool), m)
    for seg in (uncompressed, compressed, {"size": [7, 5], "counts": compressed["counts"].decode()}):
        result = masks.ann_to_rle(seg, 7, 5)
        assert result.dropped_parts == 0
        np.testing.assert_array_equal(masks.decode(result.rle), m)
        json.dumps(result.rle)  # str counts: JSON friendly


@pytest.mark.parametrize(
    "seg, message",
    [
        ({"size": [6, 5], "counts": [35]}, "differs from the image size"),
        ({"size": [7, 5], "counts": [30]}, "sum to 30"),
        ("not a segmentation", "polygon list or an RLE"),
        ([["a", "b", "c", "d", "e", "f"]], "list of numbers"),
    ],
)
def test_bad_segmentations_raise(seg, message):
    with pytest.raises(ValueError, match=message):
        masks.ann_to_rle(seg, 7, 5)


def test_union_of_rles_and_of_nothing():
    a = np.zeros((6, 9), dtype=bool)
    b = np.zeros((6, 9), dtype=bool)
    a[0:3, 0:3] = True
    b[2:6, 2:9] = True
    u = masks.union([masks.encode(a), masks.encode(b)], 6, 9)
    np.testing.assert_array_equal(u, a | b)
    assert u.dtype == bool
    assert not masks.union([], 6, 9).any() and masks.union([], 6, 9).shape == (6, 9)


def test_resize_mask_stretches_without_keeping_aspect():
    m = np.zeros((4, 8), dtype=bool)
    m[:, :4] = True  # left half
    out = masks.resize_mask(m, 4)
    assert out.shape == (4, 4) and out.dtype == bool
    np.testing.assert_array_equal(out[:, :2], True)
    np.testing.assert_array_equal(out[:, 2:], False)
    assert masks.resize_mask(np.ones((5, 3), dtype=bool), 7).all()


def test_pack_unpack_batches_and_odd_sizes():
    rng = np.random.default_rng(0)
    m = rng.random((3, 5, 5)) > 0.5  # 25 bits -> 4 bytes per mask
    bits = masks.pack(m)
    assert bits.shape == (3, masks.packed_length(5)) == (3, 4) and bits.dtype == np.uint8
    np.testing.assert_array_equal(masks.unpack(bits, 5), m)
    with pytest.raises(ValueError, match="bytes per row"):
        masks.unpack(bits, 6)


@settings(max_examples=60, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_encode_decode_round_trip(m):
    rle = masks.encode(m)
    assert rle["size"] == list(m.shape) and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(masks.decode(rle), m)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 24).flatmap(lambda s: arrays(bool, (2, s, s))))
def test_pack_unpack_round_trip(m):
    np.testing.assert_array_equal(masks.unpack(masks.pack(m), m.shape[-1]), m)
