"""The validation gallery: which images to show and their panels.

Images with several captions are shown (different captions of one image
must give different masks: that is what the text is for), preferring images
whose captions mix kinds (single, multi, no-target). Numbers on the panels
(IoU, no-target verdicts) come from evaluate's per-sample table, so the
pictures and the metrics never disagree. `gallery_html` is the page that
lists the panels next to the split's metrics.
"""

from __future__ import annotations

import html
import math
import urllib.parse
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from jurassiglip.data.manifest import Manifest
from jurassiglip.inference.predictor import Predictor
from jurassiglip.inference.render import RowSpec, panel


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
    captions = [manifest.samples.at[s, "sentence"] for s in sample_ids]
    inferred = predictor.infer(pixels[None], captions, [0] * len(captions), [size] * len(captions))
    rows = []
    for caption, sample_id, answer in zip(captions, sample_ids, inferred):
        result = table.loc[sample_id]
        rows.append(RowSpec(caption=caption, gt=manifest.original_target(sample_id), pred=answer.mask.cpu().numpy(),
                            prob=answer.prob.cpu().numpy(), iou=float(result["IoU"]), gt_nt=bool(result["gt_nt"]),
                            pred_nt=bool(result["pred_nt"])))
    return panel(image, rows, image_id=int(info["image_id"]))


def _format_metric(value: float) -> str:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    value = float(value)
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def gallery_html(
    entries: Sequence[tuple[str, str]],
    metrics: Mapping[str, float],
    rule_text: str,
    title: str = "jurassiglip validation gallery",
) -> str:
    """A self-contained HTML page: metrics table, no-target rule, panels.

    No external stylesheet, script or font; the only links are the panel
    images, by the relative paths given, so the page works from a folder
    copied anywhere (or from an MLflow artifact view).

    Args:
        entries: (title, relative PNG path) per panel, in display order.
        metrics: metric name -> value, shown in the given order (ints as
            ints, floats with 4 decimals).
        rule_text: how pred_nt was decided, e.g. "no target when predicted
            foreground < 0.2% of the image"; shown next to the numbers.
        title: page title and heading.

    Returns:
        The page as a string; every caller-provided string is HTML-escaped.
    """
    esc = html.escape
    metric_rows = "\n".join(
        f"      <tr><th>{esc(str(name))}</th><td>{esc(_format_metric(value))}</td></tr>"
        for name, value in metrics.items()
    )
    figures = "\n".join(
        "    <figure>\n"
        # Quote the path as a URL (spaces, '#', '?') and then escape it for the attribute.
        f'      <img src="{esc(urllib.parse.quote(path), quote=True)}"'
        f' alt="{esc(name, quote=True)}" loading="lazy">\n'
        f"      <figcaption>{esc(name)}</figcaption>\n"
        "    </figure>"
        for name, path in entries
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{esc(title)}</title>
  <style>
    body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #141414; }}
    table {{ border-collapse: collapse; margin-bottom: 1em; }}
    th, td {{ border: 1px solid #ccc; padding: 0.2em 0.8em; text-align: left; }}
    td {{ font-variant-numeric: tabular-nums; text-align: right; }}
    .rule {{ background: #f4f4f4; padding: 0.5em 0.8em; border-left: 4px solid #0072b2; }}
    .panels {{ display: flex; flex-wrap: wrap; gap: 1.5em; }}
    figure {{ margin: 0; }}
    figcaption {{ font-size: 0.9em; color: #555; }}
  </style>
</head>
<body>
  <h1>{esc(title)}</h1>
  <table>
    <thead><tr><th>metric</th><th>value</th></tr></thead>
    <tbody>
{metric_rows}
    </tbody>
  </table>
  <p class="rule"><strong>No-target rule:</strong> {esc(rule_text)}</p>
  <div class="panels">
{figures}
  </div>
</body>
</html>
"""
