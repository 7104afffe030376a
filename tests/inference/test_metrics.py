"""Tests of jurassiglip.inference.metrics against values worked out by hand.

Masks are drawn as strings, '#' = foreground, so every count in a comment can
be checked by eye.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from jurassiglip.inference.metrics import (
    batch_intersection_union,
    intersection_union,
    sample_iou,
    summarize,
)


def mask(*rows: str) -> np.ndarray:
    """A bool mask from rows of '#' (foreground) and '.' (background)."""
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


EMPTY = mask("....", "....", "....", "....")

# pred covers columns 0-1 of rows 0-1, gt columns 1-2 of rows 0-1:
# |pred| = 4, |gt| = 4, |pred AND gt| = 2 (column 1), |pred OR gt| = 4 + 4 - 2 = 6.
PRED = mask(
    "##..",
    "##..",
    "....",
    "....",
)
GT = mask(
    ".##.",
    ".##.",
    "....",
    "....",
)


# --- the four rows of the SPEC section 5 table ---------------------------------


def test_target_predicted_target():
    # I = |pred AND gt| = 2, U = |pred OR gt| = 6.
    assert intersection_union(PRED, GT, pred_nt=False, gt_nt=False) == (2, 6)


def test_target_predicted_no_target():
    # I forced to 0; U still |pred OR gt| = 6.
    assert intersection_union(PRED, GT, pred_nt=True, gt_nt=False) == (0, 6)


def test_no_target_predicted_target():
    # gt is empty; I = 0 and U = area of pred = 4.
    assert intersection_union(PRED, EMPTY, pred_nt=False, gt_nt=True) == (0, 4)


def test_no_target_predicted_no_target():
    # Adds nothing to cIoU, whatever the mask.
    assert intersection_union(PRED, EMPTY, pred_nt=True, gt_nt=True) == (0, 0)


def test_sample_iou_follows_the_table():
    # Rows in table order: target/target 2/6, target/nt 0, nt/target 0, nt/nt 1.
    iou = sample_iou(
        [2, 0, 0, 0],
        [6, 6, 4, 0],
        gt_nt=[False, False, True, True],
        pred_nt=[False, True, False, True],
    )
    np.testing.assert_allclose(iou, [1 / 3, 0.0, 0.0, 1.0])


def test_summarize_mixed_split():
    # Five samples: the four table rows above plus a perfect targeted one (I 4, U 4).
    #   sum I = 2 + 0 + 0 + 0 + 4 = 6, sum U = 6 + 6 + 4 + 0 + 4 = 20 -> cIoU 0.3
    #   IoUs 1/3, 0, 0, 1, 1 -> gIoU (1/3 + 2) / 5 = 7/15
    #   targeted = samples 1, 2, 5 with IoU 1/3, 0, 1 -> Pr_X = 1/3 for every X <= 1
    #   no-target = samples 3, 4, correctly called: 4 -> N_acc 1/2
    #   targeted not rejected: 1, 5 -> T_acc 2/3
    i = [2, 0, 0, 0, 4]
    u = [6, 6, 4, 0, 4]
    gt_nt = [False, False, True, True, False]
    pred_nt = [False, True, False, True, False]
    out = summarize(i, u, gt_nt, pred_nt)
    assert list(out) == [
        "cIoU", "gIoU", "Pr_0.5", "Pr_0.6", "Pr_0.7", "Pr_0.8", "Pr_0.9",
        "N_acc", "T_acc", "n_samples", "n_no_target",
    ]  # fmt: skip
    assert not any("@" in key for key in out)
    assert out["cIoU"] == pytest.approx(0.3)
    assert out["gIoU"] == pytest.approx(7 / 15)
    for x in ("0.5", "0.6", "0.7", "0.8", "0.9"):
        assert out[f"Pr_{x}"] == pytest.approx(1 / 3)
    assert out["N_acc"] == pytest.approx(0.5)
    assert out["T_acc"] == pytest.approx(2 / 3)
    assert out["n_samples"] == 5
    assert out["n_no_target"] == 2


# --- edge cases ------------------------------------------------------------------


def test_targeted_sample_with_zero_union():
    # Empty gt, empty pred, both called target: I 0, U 0, IoU 0 (not 0/0).
    i, u = intersection_union(EMPTY, EMPTY, pred_nt=False, gt_nt=False)
    assert (i, u) == (0, 0)
    assert sample_iou([i], [u], [False], [False]).tolist() == [0.0]
    out = summarize([i], [u], [False], [False])
    # sum U = 0 -> cIoU 0.0; one targeted sample with IoU 0 -> gIoU 0, Pr 0;
    # it was not rejected -> T_acc 1; no no-target samples -> N_acc 0.
    assert out["cIoU"] == 0.0
    assert out["gIoU"] == 0.0
    assert out["Pr_0.5"] == 0.0
    assert out["T_acc"] == 1.0
    assert out["N_acc"] == 0.0


def test_split_without_no_target_samples():
    # Three targeted samples, the third rejected:
    #   IoU 2/6, 4/4, 0 (I forced to 0, U 5)
    #   cIoU = (2 + 4 + 0) / (6 + 4 + 5) = 6/15 = 0.4; gIoU = (1/3 + 1 + 0) / 3 = 4/9
    #   Pr_0.5 = 1/3 (only the 4/4 sample); N_acc 0.0 (no no-target samples);
    #   T_acc = 2/3.
    out = summarize([2, 4, 0], [6, 4, 5], [False] * 3, [False, False, True])
    assert out["cIoU"] == pytest.approx(0.4)
    assert out["gIoU"] == pytest.approx(4 / 9)
    assert out["Pr_0.5"] == pytest.approx(1 / 3)
    assert out["N_acc"] == 0.0
    assert out["T_acc"] == pytest.approx(2 / 3)
    assert out["n_no_target"] == 0


def test_split_of_only_no_target_samples():
    # No targeted samples: Pr_X and T_acc are 0.0 by definition; both no-target
    # samples called correctly -> N_acc 1, gIoU 1; sum U = 0 -> cIoU 0.
    out = summarize([0, 0], [0, 0], [True, True], [True, True])
    assert out["Pr_0.5"] == 0.0
    assert out["T_acc"] == 0.0
    assert out["N_acc"] == 1.0
    assert out["gIoU"] == 1.0
    assert out["cIoU"] == 0.0


def test_empty_split():
    out = summarize([], [], [], [])
    assert out["cIoU"] == 0.0 and out["gIoU"] == 0.0 and out["n_samples"] == 0


def test_multi_target_gt_is_the_union_of_the_objects():
    # Two annotated objects: a 2x2 square (4 px) and a 1x2 bar (2 px); gt = union, 6 px.
    obj_a = mask(
        "##..",
        "##..",
        "....",
        "....",
    )
    obj_b = mask(
        "....",
        "....",
        "....",
        "..##",
    )
    # pred: all of obj_a, one pixel of obj_b, one pixel of background.
    pred = mask(
        "##..",
        "##..",
        "...#",
        "...#",
    )
    # I = 4 (obj_a) + 1 (row 3, col 3) = 5; U = 6 (gt) + 1 (row 2, col 3) = 7.
    assert intersection_union(pred, obj_a | obj_b, pred_nt=False, gt_nt=False) == (5, 7)


def test_ciou_and_giou_differ():
    # One big object predicted well and one small object predicted badly:
    #   big:   gt 8x8 = 64 px, pred the same minus its last half-row (4 px) -> I 60, U 64
    #   small: gt 2 px, pred 2 other px -> I 0, U 4
    #   cIoU = 60 / 68 = 0.88235..., gIoU = (60/64 + 0) / 2 = 0.46875
    big_gt = np.ones((8, 8), dtype=bool)
    big_pred = big_gt.copy()
    big_pred[7, 4:] = False
    small_gt = np.zeros((8, 8), dtype=bool)
    small_gt[0, 0:2] = True
    small_pred = np.zeros((8, 8), dtype=bool)
    small_pred[5, 5:7] = True
    i, u = batch_intersection_union(
        np.stack([big_pred, small_pred]), np.stack([big_gt, small_gt]), [False, False], [False, False]
    )
    assert i.tolist() == [60, 0] and u.tolist() == [64, 4]
    out = summarize(i, u, [False, False], [False, False])
    assert out["cIoU"] == pytest.approx(60 / 68)
    assert out["gIoU"] == pytest.approx(0.46875)
    assert out["cIoU"] > 0.88 > 0.47 > out["gIoU"]


def test_precision_threshold_is_inclusive():
    # IoUs 2/4 = 0.5, 7/10 = 0.7, 9/10 = 0.9, all targeted:
    #   Pr_0.5 = 3/3 (0.5 counts), Pr_0.6 = 2/3, Pr_0.7 = 2/3 (0.7 counts),
    #   Pr_0.8 = 1/3, Pr_0.9 = 1/3 (0.9 counts).
    out = summarize([2, 7, 9], [4, 10, 10], [False] * 3, [False] * 3)
    assert out["Pr_0.5"] == 1.0
    assert out["Pr_0.6"] == pytest.approx(2 / 3)
    assert out["Pr_0.7"] == pytest.approx(2 / 3)
    assert out["Pr_0.8"] == pytest.approx(1 / 3)
    assert out["Pr_0.9"] == pytest.approx(1 / 3)


def test_rejected_targeted_sample_counts_as_zero_in_precision():
    # Same perfect masks (I 4, U 4) twice; the second is rejected, so its IoU is 0:
    #   Pr_0.5 = 1/2.
    i, u = batch_intersection_union(
        np.stack([GT, GT]), np.stack([GT, GT]), pred_nt=[False, True], gt_nt=[False, False]
    )
    assert i.tolist() == [4, 0] and u.tolist() == [4, 4]
    assert summarize(i, u, [False, False], [False, True])["Pr_0.5"] == 0.5


def test_custom_thresholds_name_their_keys():
    out = summarize([3], [4], [False], [False], thresholds=(0.75,))
    assert out["Pr_0.75"] == 1.0
    assert "Pr_0.5" not in out


# --- batch helper ----------------------------------------------------------------


def test_batch_matches_single_samples_and_accepts_torch():
    preds = np.stack([PRED, PRED, PRED, PRED])
    gts = np.stack([GT, GT, EMPTY, EMPTY])
    pred_nt = [False, True, False, True]
    gt_nt = [False, False, True, True]
    expected = [intersection_union(p, g, pn, gn) for p, g, pn, gn in zip(preds, gts, pred_nt, gt_nt)]
    assert expected == [(2, 6), (0, 6), (0, 4), (0, 0)]

    i, u = batch_intersection_union(preds, gts, pred_nt, gt_nt)
    assert list(zip(i.tolist(), u.tolist())) == expected
    assert i.dtype == np.int64 and u.dtype == np.int64

    ti, tu = batch_intersection_union(
        torch.from_numpy(preds), torch.from_numpy(gts), torch.tensor(pred_nt), torch.tensor(gt_nt)
    )
    assert isinstance(ti, np.ndarray)
    assert list(zip(ti.tolist(), tu.tolist())) == expected


def test_non_boolean_masks_are_rejected():
    with pytest.raises(TypeError, match="boolean"):
        batch_intersection_union(PRED[None].astype(np.uint8) * 255, GT[None], [False], [False])


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError):
        intersection_union(PRED, GT[:3], False, False)
    with pytest.raises(ValueError):
        batch_intersection_union(PRED[None], GT[None], [False, False], [False])
    with pytest.raises(ValueError):
        summarize([1, 2], [3], [False, False], [False, False])


def test_intersection_above_union_is_rejected():
    with pytest.raises(ValueError, match="I <= U"):
        sample_iou([5], [4], [False], [False])


# --- properties --------------------------------------------------------------------

masks_4x5 = arrays(dtype=bool, shape=(4, 5))


@given(pred=masks_4x5, gt=masks_4x5, pred_nt=st.booleans(), gt_nt=st.booleans())
def test_iou_is_between_0_and_1(pred, gt, pred_nt, gt_nt):
    if gt_nt:
        gt = np.zeros_like(gt)  # a no-target expression has an empty gt
    i, u = intersection_union(pred, gt, pred_nt, gt_nt)
    assert 0 <= i <= u
    iou = sample_iou([i], [u], [gt_nt], [pred_nt])
    assert 0.0 <= iou[0] <= 1.0


@settings(max_examples=60)
@given(
    gts=arrays(dtype=bool, shape=st.tuples(st.integers(1, 6), st.just(4), st.just(4))),
    gt_nt=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_perfect_prediction_scores_one(gts, gt_nt):
    b = gts.shape[0]
    gt_nt = np.array(gt_nt[:b])
    gts = gts.copy()
    gts[gt_nt] = False
    # Every targeted sample gets a nonempty gt (a targeted gt is never empty in
    # real data; an empty one would score IoU 0 even when predicted perfectly).
    gts[~gt_nt, 0, 0] = True
    i, u = batch_intersection_union(gts, gts, gt_nt, gt_nt)
    out = summarize(i, u, gt_nt, gt_nt)
    assert out["gIoU"] == 1.0
    if (~gt_nt).any():
        assert out["cIoU"] == 1.0
        assert out["Pr_0.9"] == 1.0 and out["T_acc"] == 1.0
    if gt_nt.any():
        assert out["N_acc"] == 1.0


@given(a=masks_4x5, b=masks_4x5)
def test_swapping_pred_and_gt_keeps_iou(a, b):
    iou_ab = sample_iou(*intersection_union(a, b, False, False), [False], [False])
    iou_ba = sample_iou(*intersection_union(b, a, False, False), [False], [False])
    assert iou_ab[0] == iou_ba[0]
