"""evaluate.py on the hand-made masks of conftest.py: every number below is counted on the 4x4 grids there.

The model's answers, the two baselines, per-kind and novel subsets, and
`resolution=<int>` (masks scored at a square size: each pixel of the 4x4
grids becomes a 2x2 block at 8, so every I and U is 4 times the count).
"""

from __future__ import annotations

import numpy as np
import pytest

from jurassiglip.inference.evaluate import evaluate_split, split_metrics

# (I, U, pred_nt) of each val sample at 4x4, counted by hand:
#   s0 answer 6 px covering A (4 px): I 4, U 6          s1 answer A, gt A+B: I 4, U 8
#   s2 right no-target call: I 0, U 0 (IoU 1)           s3 wrong no-target call, gt C: I 0, U |answer or C| = 4
#   s4 2 px answered for a no-target caption: I 0, U 2
MODEL = {0: (4, 6, False), 1: (4, 8, False), 2: (0, 0, True), 3: (0, 4, True), 4: (0, 2, False)}
MODEL_IOU = {0: 4 / 6, 1: 4 / 8, 2: 1.0, 3: 0.0, 4: 0.0}
# the union of the image's objects, never no-target: image 0 -> A+B (8 px), image 1 -> C (4 px)
UNION = {0: (4, 8), 1: (8, 8), 2: (0, 8), 3: (4, 4), 4: (0, 4)}
UNION_IOU = {0: 0.5, 1: 1.0, 2: 0.0, 3: 1.0, 4: 0.0}


def val_table(predictor, manifest, resolution="original"):
    return evaluate_split(predictor, manifest, "val", resolution=resolution, batch_size=64, seed=0).set_index(
        "sample_id")


def test_per_sample_columns_of_the_model_and_the_union_baseline(scripted_predictor, hand_made_manifest):
    table = val_table(scripted_predictor, hand_made_manifest)
    assert list(table.index) == [0, 1, 2, 3, 4]
    for sample_id, (i, u, pred_nt) in MODEL.items():
        row = table.loc[sample_id]
        assert (row["I"], row["U"], row["pred_nt"]) == (i, u, pred_nt), sample_id
        assert row["IoU"] == pytest.approx(MODEL_IOU[sample_id]), sample_id
        assert (row["union_I"], row["union_U"]) == UNION[sample_id], sample_id
        assert row["union_IoU"] == pytest.approx(UNION_IOU[sample_id]), sample_id
    assert table["gt_nt"].tolist() == [False, False, True, False, True]
    assert table["nt_prob"].tolist() == [0.1, 0.2, 0.9, 0.7, 0.3]
    assert table["area"].tolist() == [6 / 16, 4 / 16, 2 / 16, 3 / 16, 2 / 16]  # of the predicted mask
    assert table["kind"].tolist() == ["single", "multi", "no_target", "single", "no_target"]
    assert table["sentence"].tolist() == ["the left square", "both squares", "the purple star", "the bottom bar",
                                          "the red circle"]


def test_split_metrics_overall_per_kind_novel_and_union_by_hand(scripted_predictor, hand_made_manifest):
    out = split_metrics(val_table(scripted_predictor, hand_made_manifest).reset_index())
    expected = {
        # cIoU = sum I / sum U = 8 / 20; gIoU = (2/3 + 1/2 + 1 + 0 + 0) / 5; targeted IoUs 2/3, 1/2, 0;
        # N_acc: s2 right, s4 wrong; T_acc: s3 rejected
        "all": dict(cIoU=8 / 20, gIoU=(2 / 3 + 1 / 2 + 1) / 5, Pr_05=2 / 3, Pr_06=1 / 3, Pr_07=0.0,
                    N_acc=1 / 2, T_acc=2 / 3, n_samples=5, n_no_target=2),
        "single": dict(cIoU=4 / 10, gIoU=(2 / 3) / 2, Pr_05=1 / 2, Pr_06=1 / 2, Pr_07=0.0, N_acc=0.0, T_acc=1 / 2,
                       n_samples=2, n_no_target=0),
        "multi": dict(cIoU=4 / 8, gIoU=1 / 2, Pr_05=1.0, Pr_06=0.0, Pr_07=0.0, N_acc=0.0, T_acc=1.0, n_samples=1,
                      n_no_target=0),
        "no_target": dict(cIoU=0 / 2, gIoU=1 / 2, Pr_05=0.0, Pr_06=0.0, Pr_07=0.0, N_acc=1 / 2, T_acc=0.0,
                          n_samples=2, n_no_target=2),
        "novel": dict(cIoU=4 / 10, gIoU=(1 / 2 + 0) / 2, Pr_05=1.0, Pr_06=0.0, Pr_07=0.0, N_acc=0.0, T_acc=1.0,
                      n_samples=2, n_no_target=1),
        # union: I 16 / U 32; IoUs 1/2, 1, 0, 1, 0; never no-target
        "baseline_union": dict(cIoU=16 / 32, gIoU=(1 / 2 + 1 + 1) / 5, Pr_05=1.0, Pr_06=2 / 3, Pr_07=2 / 3,
                               N_acc=0.0, T_acc=1.0, n_samples=5, n_no_target=2),
    }
    for subset, numbers in expected.items():
        got = out if subset == "all" else out[subset]
        for key, value in numbers.items():
            name = key.replace("Pr_0", "Pr_0.")
            assert got[name] == pytest.approx(value), (subset, name)
    assert "template" not in out  # gRefCOCO-like data: no caption templates


def test_square_resolution_scores_every_mask_at_that_size(scripted_predictor, hand_made_manifest):
    original = val_table(scripted_predictor, hand_made_manifest)
    scripted_predictor.calls.clear()
    square = val_table(scripted_predictor, hand_made_manifest, resolution=8)
    assert {size for call in scripted_predictor.calls for size in call["sizes"]} == {(8, 8)}
    for sample_id, (i, u, _) in MODEL.items():  # each pixel is a 2x2 block at 8x8
        assert (square.loc[sample_id, "I"], square.loc[sample_id, "U"]) == (4 * i, 4 * u), sample_id
        assert tuple(square.loc[sample_id, ["union_I", "union_U"]]) == tuple(4 * n for n in UNION[sample_id])
    for key in ("IoU", "union_IoU", "pred_nt", "area"):
        assert square[key].tolist() == original[key].tolist(), key
    assert split_metrics(square.reset_index())["cIoU"] == pytest.approx(8 / 20)


def test_original_resolution_asks_each_caption_at_its_images_size(scripted_predictor, hand_made_manifest):
    val_table(scripted_predictor, hand_made_manifest)
    [call] = scripted_predictor.calls  # batch 64: both images in one pass
    assert call["sizes"] == [(4, 4)] * 10 and call["n_images"] == 2
    assert call["owner"] == [0, 0, 0, 1, 1] * 2  # the model's captions, then the shuffled ones, same images


# The shuffled-caption baseline: sample t of the test split is scored with the answer to the caption it was
# given. (I, U, pred_nt) of each answer on each sample, counted by hand (D and E are 4-pixel columns):
ANSWER_ON_SAMPLE = {
    ("the left bar", 5): (4, 4, False), ("the left bar", 6): (0, 8, False), ("the left bar", 7): (0, 4, False),
    ("the right bar", 5): (0, 8, False), ("the right bar", 6): (4, 4, False), ("the right bar", 7): (0, 4, False),
    # the no-target answer: a targeted sample called no-target counts U = its target (4); a no-target one 0, 0
    ("the green star", 5): (0, 4, True), ("the green star", 6): (0, 4, True), ("the green star", 7): (0, 0, True),
}
IOU_ON_SAMPLE = {("the left bar", 5): 1.0, ("the right bar", 6): 1.0, ("the green star", 7): 1.0}  # others 0


def test_shuffled_caption_baseline_scores_the_answer_to_another_samples_caption(scripted_predictor,
                                                                                hand_made_manifest):
    captions = {5: "the left bar", 6: "the right bar", 7: "the green star"}
    permuted = 0
    for seed in range(8):
        scripted_predictor.calls.clear()
        table = evaluate_split(scripted_predictor, hand_made_manifest, "test", resolution="original",
                               batch_size=64, seed=seed).set_index("sample_id")
        [call] = scripted_predictor.calls
        given = dict(zip([5, 6, 7], call["captions"][3:]))  # the second half: the shuffled captions, in order
        assert call["captions"][:3] == [captions[5], captions[6], captions[7]]
        assert sorted(given.values()) == sorted(captions.values()), given  # a permutation of the split's
        permuted += given != captions
        for sample_id, caption in given.items():
            i, u, pred_nt = ANSWER_ON_SAMPLE[(caption, sample_id)]
            row = table.loc[sample_id]
            assert (row["shuffled_I"], row["shuffled_U"], row["shuffled_pred_nt"]) == (i, u, pred_nt), (seed, given)
            assert row["shuffled_IoU"] == IOU_ON_SAMPLE.get((caption, sample_id), 0.0), (seed, given)
        baseline = split_metrics(table.reset_index())["baseline_shuffled_text"]
        cells = [ANSWER_ON_SAMPLE[(caption, s)] for s, caption in given.items()]
        assert baseline["cIoU"] == pytest.approx(sum(c[0] for c in cells) / sum(c[1] for c in cells))
        assert baseline["N_acc"] == float(given[7] == "the green star")
        # the model itself answers every test caption right
        assert (table["IoU"].tolist(), split_metrics(table.reset_index())["cIoU"]) == ([1.0, 1.0, 1.0], 1.0)
    assert permuted >= 4, f"only {permuted} of 8 seeds moved any caption: the baseline barely shuffles"


def test_same_seed_same_shuffle_and_batch_size_does_not_change_it(scripted_predictor, hand_made_manifest):
    tables = [evaluate_split(scripted_predictor, hand_made_manifest, "val", resolution="original", batch_size=b,
                             seed=3) for b in (1, 6, 64)]  # 1 and 6: one image per pass
    assert [len(call["captions"]) for call in scripted_predictor.calls] == [6, 4, 6, 4, 10]  # 2 passes, 2, 1
    for table in tables[1:]:
        assert np.array_equal(table.to_numpy(), tables[0].to_numpy())
