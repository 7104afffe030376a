"""The validation gallery: which images to show and their panels.

Images with several captions are shown (different captions of one image
must give different masks: that is what the text is for), preferring images
whose captions mix kinds (single, multi, no-target). Numbers on the panels
(IoU, no-target verdicts) come from evaluate's per-sample table, so the
pictures and the metrics never disagree.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from jurassiglip.data.manifest import Manifest
from jurassiglip.predict import Predictor, upsample_probabilities
from jurassiglip.render import RowSpec, panel


def pick_images(samples: pd.DataFrame, n_images: int, max_captions: int) -> list[tuple[int, list[int]]]:
    """Up to `n_images` (image_index, sample_ids) pairs, most varied captions first, deterministic.

    Args:
        samples: the split's rows of the manifest (or of the evaluation table) with
            image_index, sample_id and kind.
    """
    groups = []
    for image_index, rows in samples.groupby("image_index", sort=True):
        if len(rows) < 2:
            continue
        # One caption of each kind first, then the rest, in sample order.
        ordered = pd.concat([rows.drop_duplicates("kind"), rows]).drop_duplicates("sample_id")
        groups.append((-rows["kind"].nunique(), int(image_index), ordered["sample_id"].tolist()[:max_captions]))
    groups.sort()
    return [(image_index, ids) for _, image_index, ids in groups[:n_images]]


def image_panel(predictor: Predictor, manifest: Manifest, table: pd.DataFrame, image_index: int,
                sample_ids: list[int]) -> Image.Image:
    """One panel: a row per caption with ground truth, TP/FP/FN and probabilities at original size.

    Args:
        table: evaluate's per-sample table indexed by sample_id (IoU, gt_nt, pred_nt).
    """
    info = manifest.images_table.iloc[image_index]
    size = (int(info["height"]), int(info["width"]))
    pixels = manifest.images[image_index]  # (S, S, 3)
    image = np.asarray(Image.fromarray(np.asarray(pixels)).resize((size[1], size[0]), Image.BILINEAR))
    patches = predictor.encode_images(pixels[None])  # (1, N, D)
    captions = [manifest.samples.at[s, "sentence"] for s in sample_ids]
    tokens, mask = predictor.encode_texts(captions)
    logits, nt_prob = predictor.outputs(patches.expand(len(captions), -1, -1), tokens, mask)
    prob = upsample_probabilities(logits, size)
    pred, _ = predictor.decision.masks(prob, nt_prob)
    rows = []
    for k, sample_id in enumerate(sample_ids):
        result = table.loc[sample_id]
        rows.append(RowSpec(caption=captions[k], gt=manifest.original_target(sample_id), pred=pred[k].cpu().numpy(),
                            prob=prob[k].cpu().numpy(), iou=float(result["IoU"]), gt_nt=bool(result["gt_nt"]),
                            pred_nt=bool(result["pred_nt"])))
    return panel(image, rows, image_id=int(info["image_id"]))
