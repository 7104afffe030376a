"""Frozen-backbone feature cache for segmentation finetuning.

In stage 2 only cross-attention and the head train; the towers are frozen,
so their outputs are the same every epoch. They are computed once here (one
vision pass per unique image, not per caption; one text pass per caption)
and stored in fp16:

    patches.npy    (n_images_cached, N, D)   patch tokens per image
    text.npy       (n_samples_cached, L, D)  projected text tokens per caption
    text_mask.npy  (n_samples_cached, L)     attention mask (bool)
    index.npz      image_row[image_index], sample_row[sample_id] (-1 = not cached)
    meta.json      fingerprint, shapes, vision/text pass counts

The cache is reused while its fingerprint (pretrain checkpoint, manifest,
splits, code) matches, and rebuilt atomically otherwise.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from jurassiglip import atomic
from jurassiglip.data.datasets import BatchDataset, target_masks
from jurassiglip.data.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass
class FeatureCache:
    """Memory-mapped view of a cache folder."""

    patches: np.ndarray     # (n_images_cached, N, D) float16
    text: np.ndarray        # (n_samples_cached, L, D) float16
    text_mask: np.ndarray   # (n_samples_cached, L) bool
    image_row: np.ndarray   # (n_images,) int64, -1 = not cached
    sample_row: np.ndarray  # (n_samples,) int64, -1 = not cached
    meta: dict

    @classmethod
    def open(cls, folder: Path) -> FeatureCache:
        index = np.load(folder / "index.npz")
        return cls(
            patches=np.load(folder / "patches.npy", mmap_mode="r"),
            text=np.load(folder / "text.npy", mmap_mode="r"),
            text_mask=np.load(folder / "text_mask.npy", mmap_mode="r"),
            image_row=index["image_row"],
            sample_row=index["sample_row"],
            meta=json.loads((folder / "meta.json").read_text()),
        )


def cached_fingerprint(folder: Path) -> str | None:
    try:
        return json.loads((folder / "meta.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


@torch.no_grad()
def build_cache(model: torch.nn.Module, manifest: Manifest, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                sample_ids: np.ndarray, folder: Path, *, batch_size: int, fingerprint: str) -> FeatureCache:
    """Encode the images and captions of `sample_ids` once and store them (atomically) in `folder`.

    Args:
        model: JurasSigLIP with frozen towers (eval mode is set here).
        input_ids, attention_mask: (n_samples, L) tokens of every manifest row.
        sample_ids: manifest rows to cache (their images are cached once each).
    """
    if cached_fingerprint(folder) == fingerprint:
        log.info("feature cache %s is up to date; reusing it", folder)
        return FeatureCache.open(folder)
    model.eval()
    dev = next(model.parameters()).device
    sample_ids = np.sort(np.asarray(sample_ids, dtype=np.int64))
    image_ids = np.unique(manifest.samples["image_index"].to_numpy()[sample_ids])
    n_images, n_samples = len(manifest.images_table), len(manifest.samples)
    with atomic.atomic_dir(folder) as tmp:
        patches = _encode_images(model, manifest, image_ids, batch_size, dev, tmp / "patches.npy")
        text, text_mask = _encode_texts(model, input_ids, attention_mask, sample_ids, batch_size, dev, tmp)
        image_row = np.full(n_images, -1, dtype=np.int64)
        image_row[image_ids] = np.arange(len(image_ids))
        sample_row = np.full(n_samples, -1, dtype=np.int64)
        sample_row[sample_ids] = np.arange(len(sample_ids))
        np.savez(tmp / "index.npz", image_row=image_row, sample_row=sample_row)
        meta = {"fingerprint": fingerprint, "vision_passes": int(len(image_ids)), "text_passes": int(len(sample_ids)),
                "patches_shape": list(patches.shape), "text_shape": list(text.shape)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        del patches, text, text_mask  # flush the memmaps before the folder is swapped in
    log.info("feature cache: %d images, %d captions -> %s", len(image_ids), len(sample_ids), folder)
    return FeatureCache.open(folder)


def _encode_images(model, manifest: Manifest, image_ids: np.ndarray, batch_size: int, dev: torch.device,
                   path: Path) -> np.ndarray:
    out = None
    for start in tqdm(range(0, len(image_ids), batch_size), desc="cache images", leave=False, disable=None):
        chunk = image_ids[start:start + batch_size]
        images = torch.from_numpy(np.ascontiguousarray(manifest.images[chunk])).permute(0, 3, 1, 2).to(dev)
        patches, _ = model.encode_image(images)  # (B, N, D)
        if out is None:
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16,
                                            shape=(len(image_ids), *patches.shape[1:]))
        out[start:start + len(chunk)] = _to_fp16(patches, "patch tokens of image_index", chunk)
    return out


def _encode_texts(model, input_ids, attention_mask, sample_ids: np.ndarray, batch_size: int, dev: torch.device,
                  folder: Path) -> tuple[np.ndarray, np.ndarray]:
    text = mask = None
    for start in tqdm(range(0, len(sample_ids), batch_size * 4), desc="cache captions", leave=False, disable=None):
        chunk = torch.from_numpy(sample_ids[start:start + batch_size * 4])
        tokens, token_mask, _ = model.encode_text(input_ids[chunk].to(dev), attention_mask[chunk].to(dev))
        if text is None:
            text = np.lib.format.open_memmap(folder / "text.npy", mode="w+", dtype=np.float16,
                                             shape=(len(sample_ids), *tokens.shape[1:]))
            mask = np.lib.format.open_memmap(folder / "text_mask.npy", mode="w+", dtype=np.bool_,
                                             shape=(len(sample_ids), tokens.shape[1]))
        text[start:start + len(chunk)] = _to_fp16(tokens, "text tokens of sample_id", chunk.numpy())
        mask[start:start + len(chunk)] = token_mask.bool().cpu().numpy()
    return text, mask


class NonFiniteFeatures(FloatingPointError):
    """Backbone outputs that are NaN/inf or do not fit the cache's fp16; the message names the rows."""


FP16_MAX = float(np.finfo(np.float16).max)  # 65504: larger values would be stored as inf


def _to_fp16(features: torch.Tensor, what: str, ids: np.ndarray) -> np.ndarray:
    """(B, ...) features -> fp16 numpy, refusing rows that are non-finite or beyond the fp16 range."""
    values = features.float().cpu().numpy()  # (B, ...)
    flat = values.reshape(len(values), -1)
    bad = ~(np.abs(flat) <= FP16_MAX).all(axis=1)  # NaN compares False, so it counts as bad too
    if bad.any():
        raise NonFiniteFeatures(
            f"feature cache: {what} {np.asarray(ids)[bad].tolist()} are NaN/inf or exceed the fp16 range "
            f"+-{FP16_MAX:g}; set finetune.cache_features=false to train on live fp32 features, or check the "
            f"pretrained weights")
    return values.astype(np.float16)


class CachedSegDataset(BatchDataset):
    """Stage-2 batches from the cache: patch tokens, text tokens, mask, target, no-target flag.

    A batch holds sample_id (B,), patches fp16 (B, N, D), text fp16 (B, L, D),
    text_mask bool (B, L), target bool (B, 1, S, S) and no_target bool (B,).
    """

    def __init__(self, manifest: Manifest, cache: FeatureCache):
        self.manifest = manifest
        self.cache = cache
        self.image_index = manifest.samples["image_index"].to_numpy()
        self.no_target = manifest.samples["no_target"].to_numpy(bool)

    def __len__(self) -> int:
        return len(self.image_index)

    def fetch(self, sample_ids: np.ndarray) -> dict[str, torch.Tensor]:
        image_rows = self.cache.image_row[self.image_index[sample_ids]]
        sample_rows = self.cache.sample_row[sample_ids]
        missing = (image_rows < 0) | (sample_rows < 0)
        if missing.any():
            raise IndexError(f"samples {sample_ids[missing][:10].tolist()} are not in the feature cache: only the "
                             f"training and validation splits are cached")
        return {
            "sample_id": torch.from_numpy(sample_ids),
            "patches": torch.from_numpy(self.cache.patches[image_rows]),      # (B, N, D) fp16
            "text": torch.from_numpy(self.cache.text[sample_rows]),           # (B, L, D) fp16
            "text_mask": torch.from_numpy(self.cache.text_mask[sample_rows]),  # (B, L)
            "target": target_masks(self.manifest, sample_ids),                 # (B, 1, S, S) bool
            "no_target": torch.from_numpy(self.no_target[sample_ids]),        # (B,)
        }
