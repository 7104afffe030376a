"""Frozen-backbone feature cache for segmentation finetuning.

In stage 2 only cross-attention and the head train; the towers are frozen,
so their outputs are the same every epoch. They are computed once here (one
vision pass per unique image, not per caption; one text pass per caption;
bf16 autocast on CUDA, fp32 on CPU) and stored in fp16:

    patches.npy    (n_images_cached, N, D)    patch tokens per image
    text.npy       (n_samples_cached, L', D)  projected text tokens per caption
    text_mask.npy  (n_samples_cached, L')     attention mask (bool)
    index.npz      image_row[image_index], sample_row[sample_id] (-1 = not cached)
    meta.json      fingerprint, shapes, text_length L', vision/text pass counts

L' is the length of the longest cached caption (its last real position + 1,
at least 1), not the tokenizer's text_max_len L. The towers still read all
L positions; only the stored tokens stop at L'. Every position past L' is
padding in every cached caption, the fusion masks padded keys, and stage 2
reads nothing else of the text (the global feature is stage 1's), so the
trim changes no result. SigLIP2 pads to 64 positions while gRefCOCO
captions are a few tokens long: most of the text cache was padding.

The ranks of a torchrun job build the cache together. Rank 0 creates a
temporary sibling folder and preallocates the three .npy files at their
final shapes; every rank then encodes a contiguous share of the batches
and writes its rows in place; rank 0 writes index.npz and meta.json and
swaps the folder in. The batches are the single-process ones, so the bytes
do not depend on the number of ranks. One process is the same path with a
world of one. The cache is reused while its fingerprint (pretrain
checkpoint, manifest, splits, code) matches, and rebuilt atomically
otherwise; every rank checks the fingerprint of the folder it opens and
stops if it differs from its own (e.g. nodes that do not share data/).

Why one long module: building the cache (across ranks) and reading it share the file layout.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from jurassiglip.runtime import atomic

from jurassiglip.runtime import distributed
from jurassiglip.data.datasets import BatchDataset, target_masks
from jurassiglip.data.manifest import Manifest
from jurassiglip.runtime.env import autocast

log = logging.getLogger(__name__)

TEXT_BATCH_FACTOR = 4  # captions are cheaper than images: 4 x batch_size captions per text pass


class CacheMismatch(RuntimeError):
    """The cache folder a rank opens is missing or was built for another fingerprint."""


@dataclass
class FeatureCache:
    """Memory-mapped view of a cache folder."""

    patches: np.ndarray     # (n_images_cached, N, D) float16
    text: np.ndarray        # (n_samples_cached, L', D) float16
    text_mask: np.ndarray   # (n_samples_cached, L') bool
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


def text_length(attention_mask: torch.Tensor) -> int:
    """L' of (n, L) attention masks: the last real position of any row + 1; at least 1 (also for n = 0)."""
    real = attention_mask.bool()  # (n, L)
    positions = torch.arange(1, real.shape[1] + 1)  # (L,) position + 1
    ends = (real * positions).amax(dim=1) if len(real) else torch.zeros(0, dtype=torch.long)  # (n,) 0 = empty
    return max(int(ends.max()) if len(ends) else 0, 1)


@torch.no_grad()
def build_cache(model: torch.nn.Module, manifest: Manifest, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                sample_ids: np.ndarray, folder: Path, *, batch_size: int, fingerprint: str) -> FeatureCache:
    """Encode the images and captions of `sample_ids` once and store them (atomically) in `folder`.

    A collective under torchrun: every rank calls it with the same arguments
    and encodes its share. Rank 0 decides whether the folder is up to date.

    Args:
        model: JurasSigLIP with frozen towers (eval mode is set here); the cache's
            shapes come from its `grid` and `vision.hidden_size`.
        input_ids, attention_mask: (n_samples, L) tokens of every manifest row.
        sample_ids: manifest rows to cache (their images are cached once each).

    Raises:
        CacheMismatch: on a rank whose view of `folder` after the build holds
            another fingerprint than its own, or no cache.
    """
    folder = Path(folder)
    if distributed.broadcast(cached_fingerprint(folder) == fingerprint if distributed.is_main() else None):
        log.info("feature cache %s is up to date; reusing it", folder)
    else:
        _build(model, manifest, input_ids, attention_mask, sample_ids, folder, batch_size, fingerprint)
    found = cached_fingerprint(folder)
    if found != fingerprint:
        raise CacheMismatch(
            f"feature cache {folder}: rank {distributed.rank()} expects fingerprint {fingerprint} but finds "
            f"{found or 'no cache'} there after the build; all ranks must run the same code on the same "
            f"data/ folder (a filesystem every node shares)")
    return FeatureCache.open(folder)


def _build(model: torch.nn.Module, manifest: Manifest, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           sample_ids: np.ndarray, folder: Path, batch_size: int, fingerprint: str) -> None:
    """Build the cache into a temporary folder, every rank its share, and swap it in (rank 0)."""
    model.eval()
    dev = next(model.parameters()).device
    main, world = distributed.is_main(), distributed.world_size()
    sample_ids = np.sort(np.asarray(sample_ids, dtype=np.int64))
    image_ids = np.unique(manifest.samples["image_index"].to_numpy()[sample_ids])
    n_images, n_samples = len(manifest.images_table), len(manifest.samples)
    n_patches, width = model.grid ** 2, model.vision.hidden_size
    length = text_length(attention_mask[torch.from_numpy(sample_ids)])
    shapes = {"patches.npy": ((len(image_ids), n_patches, width), np.float16),
              "text.npy": ((len(sample_ids), length, width), np.float16),
              "text_mask.npy": ((len(sample_ids), length), np.bool_)}
    with (atomic.atomic_dir(folder) if main else nullcontext()) as tmp:
        tmp = Path(distributed.broadcast(str(tmp) if main else None))  # rank 0's temporary folder
        if main:
            for name, (shape, dtype) in shapes.items():
                _allocate(tmp / name, shape, dtype)
        distributed.barrier()  # the files exist at their final size
        error = None
        try:
            _encode_images(model, manifest, image_ids, batch_size, dev, tmp / "patches.npy")
            _encode_texts(model, input_ids, attention_mask, sample_ids, length, batch_size * TEXT_BATCH_FACTOR,
                          dev, tmp)
        except Exception as err:  # noqa: BLE001 - re-raised below, once every rank knows
            error = err
        failed = int(distributed.all_reduce_sum([error is not None])[0])  # also the barrier: all rows written
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"feature cache {folder}: {failed} other rank(s) failed while encoding; see their "
                               f"errors")
        if main:
            image_row = np.full(n_images, -1, dtype=np.int64)
            image_row[image_ids] = np.arange(len(image_ids))
            sample_row = np.full(n_samples, -1, dtype=np.int64)
            sample_row[sample_ids] = np.arange(len(sample_ids))
            np.savez(tmp / "index.npz", image_row=image_row, sample_row=sample_row)
            meta = {"fingerprint": fingerprint, "vision_passes": int(len(image_ids)),
                    "text_passes": int(len(sample_ids)), "patches_shape": list(shapes["patches.npy"][0]),
                    "text_shape": list(shapes["text.npy"][0]), "text_length": length,
                    "text_max_len": int(attention_mask.shape[1])}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    distributed.barrier()  # rank 0 has swapped the folder in
    log.info("feature cache: %d images, %d captions (%d of %d text positions kept), %d rank(s) -> %s",
             len(image_ids), len(sample_ids), length, attention_mask.shape[1], world, folder)


def _share(n_rows: int, batch_size: int) -> range:
    """Start rows of this rank's batches: a contiguous run of the single-process batches."""
    starts = range(0, n_rows, batch_size)
    rank, world = distributed.rank(), distributed.world_size()
    return starts[len(starts) * rank // world:len(starts) * (rank + 1) // world]


def _allocate(path: Path, shape: tuple[int, ...], dtype: type) -> None:
    """An .npy file of `shape` at its full size, zero-filled (sparse until the ranks write their rows)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.truncate(handle.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize)


class _RowWriter:
    """Writes rows of a preallocated .npy in place, at their byte offsets.

    Positioned writes touch exactly the bytes of the rows, so ranks on
    several machines can fill disjoint rows of one file on a shared
    filesystem (a memory map would write back whole pages, and a page can
    straddle two ranks' rows).
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as handle:
            np.lib.format.read_magic(handle)
            shape, _, self.dtype = np.lib.format.read_array_header_1_0(handle)
            self.offset = handle.tell()
        self.row_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, start: int, rows: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(rows, dtype=self.dtype)).cast("B")
        position = self.offset + start * self.row_bytes
        while len(data):
            written = os.pwrite(self.fd, data, position)
            data, position = data[written:], position + written

    def close(self) -> None:
        os.fsync(self.fd)  # on disk before rank 0 swaps the folder in
        os.close(self.fd)


def _encode_images(model, manifest: Manifest, image_ids: np.ndarray, batch_size: int, dev: torch.device,
                   path: Path) -> None:
    out = _RowWriter(path)
    try:
        for start in tqdm(_share(len(image_ids), batch_size), desc="cache images", leave=False, disable=None):
            chunk = image_ids[start:start + batch_size]
            images = torch.from_numpy(np.ascontiguousarray(manifest.images[chunk])).permute(0, 3, 1, 2).to(dev)
            with autocast(dev):
                patches, _ = model.encode_image(images)  # (B, N, D)
            out.write(start, _to_fp16(patches, "patch tokens of image_index", chunk))
    finally:
        out.close()


def _encode_texts(model, input_ids, attention_mask, sample_ids: np.ndarray, length: int, batch_size: int,
                  dev: torch.device, folder: Path) -> None:
    text, mask = _RowWriter(folder / "text.npy"), _RowWriter(folder / "text_mask.npy")
    try:
        for start in tqdm(_share(len(sample_ids), batch_size), desc="cache captions", leave=False, disable=None):
            chunk = torch.from_numpy(sample_ids[start:start + batch_size])
            with autocast(dev):  # the tower reads all L positions; only the first L' are kept
                tokens, token_mask, _ = model.encode_text(input_ids[chunk].to(dev), attention_mask[chunk].to(dev))
            text.write(start, _to_fp16(tokens[:, :length], "text tokens of sample_id", chunk.numpy()))  # (B, L', D)
            mask.write(start, token_mask[:, :length].bool().cpu().numpy())  # (B, L')
    finally:
        text.close()
        mask.close()


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

    A batch holds sample_id (B,), patches fp16 (B, N, D), text fp16 (B, L', D),
    text_mask bool (B, L'), image uint8 (B, 3, S, S) (for a decoder that reads
    the image again), target bool (B, 1, S, S) and no_target bool (B,);
    L' is the cache's trimmed text length (see the module docstring).
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
            "text": torch.from_numpy(self.cache.text[sample_rows]),           # (B, L', D) fp16
            "text_mask": torch.from_numpy(self.cache.text_mask[sample_rows]),  # (B, L')
            "image": torch.from_numpy(self.manifest.images[self.image_index[sample_ids]]).permute(0, 3, 1, 2),
            "target": target_masks(self.manifest, sample_ids),                 # (B, 1, S, S) bool
            "no_target": torch.from_numpy(self.no_target[sample_ids]),        # (B,)
        }
