"""Scoring a trained model on a split, with two baselines that show the text matters.

For every sample of a split the model's mask and no-target verdict are
compared with the ground truth at the evaluation resolution (the image's
own size, as LAVT/CRIS score, or a square size such as 480, as the GRES
evaluator does); logits are upsampled, never binarised masks. In the same
pass two baselines are scored:

- shuffled text: the same model with the captions permuted among the
  split's samples (a model that ignores the text loses nothing here);
- text-blind union: the union of all annotated objects of the image, never
  no-target (what a model that only finds "objects" would get).

Both variants of a batch of images go through one `Predictor.infer` call
(the images are encoded once). The result is a per-sample table (one row per
caption) and the metrics computed from it (metrics.py does the arithmetic).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
from tqdm import tqdm

from jurassiglip.inference import metrics
from jurassiglip.data.manifest import Manifest
from jurassiglip.data.masks import resize_mask
from jurassiglip.inference.predictor import Inference, Predictor

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["sample_id", "ref_id", "sent_id", "image_id", "split", "sentence", "kind", "novel",
                 "template", "gt_nt", "pred_nt", "nt_prob", "I", "U", "IoU", "area",
                 "shuffled_pred_nt", "shuffled_I", "shuffled_U", "shuffled_IoU",
                 "union_I", "union_U", "union_IoU"]


def evaluate_split(predictor: Predictor, manifest: Manifest, split: str, *, resolution: str | int,
                   batch_size: int, seed: int,
                   originals: Callable[[int], np.ndarray] | None = None, window_stride: float = 0.5) -> pd.DataFrame:
    """Per-sample results of the model and both baselines on one split.

    Args:
        resolution: "original" or a square size in pixels.
        batch_size: captions per forward pass, the shuffled-text ones included; whole
            images are taken in order, so a pass holds at least one image's captions
            (twice: model and shuffled text).
        seed: permutation of the shuffled-text baseline.
        originals: sliding-window inference (`Predictor.infer`'s full_images): image_index -> the
            uint8 (H, W, 3) image at its own size. The manifest keeps images at the training size
            only, so the caller reads them (benchmarks/sliding_window.py). window_stride: their step.
    """
    rows = manifest.split(split)
    sample_ids = rows["sample_id"].to_numpy()
    captions = rows["sentence"].tolist()
    rng = np.random.default_rng(seed)
    shuffled = dict(zip(sample_ids.tolist(), [captions[j] for j in rng.permutation(len(captions))]))
    by_image = rows.groupby("image_index", sort=True)["sample_id"].apply(list)
    records: list[dict] = []
    for chunk in tqdm(_pack(by_image, batch_size), desc=f"evaluate {split}", leave=False, disable=None):
        ids = [sid for idx in chunk for sid in by_image[idx]]
        owner = [k for k, idx in enumerate(chunk) for _ in by_image[idx]]
        sizes = [_size(manifest, sid, resolution) for sid in ids]
        texts = [manifest.samples.at[s, "sentence"] for s in ids] + [shuffled[s] for s in ids]
        full = None if originals is None else [originals(idx) for idx in chunk]
        results = predictor.infer(manifest.images[chunk], texts, owner * 2, sizes * 2, full_images=full,
                                  window_stride=window_stride)
        _score(manifest, ids, results[:len(ids)], resolution, "model", records)
        _score(manifest, ids, results[len(ids):], resolution, "shuffled", records)
    table = pd.DataFrame.from_records(records)
    table = table.groupby("sample_id", sort=True).first().reset_index()
    meta = manifest.samples.loc[table["sample_id"], ["ref_id", "sent_id", "image_id", "split", "sentence", "kind",
                                                     "novel", "template"]].reset_index(drop=True)
    table = pd.concat([table, meta], axis=1)
    return table[TABLE_COLUMNS]


def _pack(by_image: pd.Series, batch_size: int) -> list[list[int]]:
    """Image indices in order, cut into chunks whose captions (x2: model and shuffled) fit `batch_size`."""
    chunks: list[list[int]] = []
    used = batch_size  # start a chunk at the first image
    for image_index, ids in by_image.items():
        if used + 2 * len(ids) > batch_size:
            chunks.append([])
            used = 0
        chunks[-1].append(int(image_index))
        used += 2 * len(ids)
    return chunks


def _size(manifest: Manifest, sample_id: int, resolution: str | int) -> tuple[int, int]:
    """(H, W) at which a sample is scored: the image's own size or the square evaluation size."""
    if resolution == "original":
        row = manifest.samples.iloc[sample_id]
        return int(row["height"]), int(row["width"])
    return int(resolution), int(resolution)


def _score(manifest: Manifest, ids: list[int], results: list[Inference], resolution: str | int, variant: str,
           records: list[dict]) -> None:
    for sample_id, result in zip(ids, results):
        row = manifest.samples.iloc[sample_id]
        gt = _at_resolution(manifest.original_target(sample_id), resolution)
        pred_np, pred_nt = result.mask.cpu().numpy(), result.no_target
        if pred_np.shape != gt.shape:
            raise ValueError(f"sample {sample_id}: mask {pred_np.shape} but ground truth {gt.shape}")
        gt_nt = bool(row["no_target"])
        i, u = metrics.intersection_union(pred_np, gt, pred_nt, gt_nt)
        iou = float(metrics.sample_iou([i], [u], [gt_nt], [pred_nt])[0])
        if variant == "model":
            union = _at_resolution(manifest.original_objects(int(row["image_index"])), resolution)
            ui, uu = metrics.intersection_union(union, gt, False, gt_nt)
            records.append({"sample_id": sample_id, "gt_nt": gt_nt, "pred_nt": pred_nt,
                            "nt_prob": result.no_target_prob, "I": i, "U": u, "IoU": iou,
                            "area": float(pred_np.mean()), "union_I": ui, "union_U": uu,
                            "union_IoU": float(metrics.sample_iou([ui], [uu], [gt_nt], [False])[0])})
        else:
            records.append({"sample_id": sample_id, "shuffled_pred_nt": pred_nt, "shuffled_I": i,
                            "shuffled_U": u, "shuffled_IoU": iou})


def _at_resolution(mask: np.ndarray, resolution: str | int) -> np.ndarray:
    return mask if resolution == "original" else resize_mask(mask, int(resolution))


def split_metrics(table: pd.DataFrame) -> dict[str, dict]:
    """Metrics of one split's table: overall, per kind, novel combinations, and the two baselines."""

    def score(t: pd.DataFrame, prefix: str = "", pred_nt: str = "pred_nt") -> dict[str, float]:
        gt_nt = t["gt_nt"].to_numpy(bool)
        nt = np.zeros(len(t), bool) if pred_nt == "" else t[pred_nt].to_numpy(bool)
        return metrics.summarize(t[f"{prefix}I"].to_numpy(), t[f"{prefix}U"].to_numpy(), gt_nt, nt)

    out: dict[str, dict] = dict(score(table))
    for kind in ("single", "multi", "no_target"):
        subset = table[table["kind"] == kind]
        if len(subset):
            out[kind] = score(subset)
    novel = table[table["novel"]]
    if len(novel):
        out["novel"] = score(novel)
    templates = sorted(t for t in table["template"].unique() if t)  # "" for data without templates (gRefCOCO)
    if templates:
        out["template"] = {name: score(table[table["template"] == name]) for name in templates}
    out["baseline_shuffled_text"] = score(table, "shuffled_", "shuffled_pred_nt")
    out["baseline_union"] = score(table, "union_", "")
    return out
