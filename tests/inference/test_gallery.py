"""gallery.py: which images the gallery shows, what each panel is drawn from, the page's numbers.

Panels are checked against `render.panel` drawn from the hand-made rows of
conftest.py: the gallery must hand it the manifest's ground truth, the
predictor's answer at the image's size, and evaluate's IoU and verdicts
(never numbers of its own). The page's escaping is in test_render.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from handmade import ANSWERS, SAMPLES

from jurassiglip.inference.evaluate import evaluate_split
from jurassiglip.inference.gallery import gallery_html, image_panel, pick_images
from jurassiglip.inference.render import RowSpec, panel


def kinds_table(groups: dict[int, list[tuple[int, str]]]) -> pd.DataFrame:
    rows = [(sample_id, image_index, kind) for image_index, members in groups.items() for sample_id, kind in members]
    return pd.DataFrame(rows, columns=["sample_id", "image_index", "kind"]).sort_values("sample_id")


SPLIT = kinds_table({
    0: [(0, "single"), (1, "multi"), (2, "no_target")],                  # 3 kinds
    1: [(3, "single"), (4, "no_target")],                                # 2 kinds
    2: [(5, "single")],                                                  # one caption: never shown
    3: [(6, "single"), (7, "single"), (8, "multi"), (9, "single")],      # 2 kinds
    4: [(10, "multi"), (11, "no_target"), (12, "single")],               # 3 kinds
})


def test_images_with_more_kinds_of_caption_come_first_then_by_index():
    assert pick_images(SPLIT, n_images=3, max_captions=3) == [(0, [0, 1, 2]), (4, [10, 11, 12]), (1, [3, 4])]


def test_one_caption_of_each_kind_comes_before_the_rest_of_an_image():
    # image 3: its single and its multi caption first (sample order), then the other singles
    assert pick_images(SPLIT, n_images=10, max_captions=4)[-1] == (3, [6, 8, 7, 9])
    assert pick_images(SPLIT, n_images=10, max_captions=2) == [(0, [0, 1]), (4, [10, 11]), (1, [3, 4]), (3, [6, 8])]
    assert pick_images(SPLIT[SPLIT["image_index"] == 2], n_images=5, max_captions=4) == []


def test_a_panel_is_drawn_from_the_manifest_the_answers_and_evaluates_table(scripted_predictor,
                                                                           hand_made_manifest):
    table = evaluate_split(scripted_predictor, hand_made_manifest, "val", resolution="original", batch_size=64,
                           seed=0).set_index("sample_id", drop=False)
    scripted_predictor.calls.clear()
    drawn = image_panel(scripted_predictor, hand_made_manifest, table, 0, [1, 2, 0])
    [call] = scripted_predictor.calls
    assert call == {"n_images": 1, "captions": ["both squares", "the purple star", "the left square"],
                    "owner": [0, 0, 0], "sizes": [(4, 4)] * 3}

    rows = []
    for sample_id, iou, gt_nt, pred_nt in [(1, 0.5, False, False), (2, 1.0, True, True), (0, 4 / 6, False, False)]:
        caption, target = SAMPLES[sample_id][3], SAMPLES[sample_id][6]
        answer = ANSWERS[caption][0]
        rows.append(RowSpec(caption=caption, gt=target, pred=answer, prob=np.where(answer, 0.75, 0.25),
                            iou=iou, gt_nt=gt_nt, pred_nt=pred_nt))
    expected = panel(np.asarray(hand_made_manifest.images[0]), rows, image_id=100)
    assert np.array_equal(np.asarray(drawn), np.asarray(expected))

    table.loc[2, "pred_nt"] = False  # evaluate's verdict is what the panel shows, whatever the answer says
    changed = image_panel(scripted_predictor, hand_made_manifest, table, 0, [1, 2, 0])
    assert not np.array_equal(np.asarray(changed), np.asarray(expected))


def test_page_keeps_the_metrics_order_and_shows_counts_as_integers_and_nan_as_such():
    page = gallery_html([], {"n_samples": 12, "cIoU": float("nan"), "gIoU": 0.123456}, rule_text="rule")
    rows = [line.strip() for line in page.splitlines() if line.strip().startswith("<tr><th>")]
    assert rows == ["<tr><th>n_samples</th><td>12</td></tr>", "<tr><th>cIoU</th><td>nan</td></tr>",
                    "<tr><th>gIoU</th><td>0.1235</td></tr>"]
