"""build_manifest: turn a `RefDataset` into the manifest directory (format: manifest.py).

Images, target masks (one row per ref) and all-objects masks are decoded and
resized in worker processes (decode.py); results come back in row order, so
the files are byte-identical for any worker count. Tables and summary.json
follow. The directory is written to a temporary sibling and renamed at the
end (runtime/atomic.py), so a failed build never leaves a half-written
manifest nor touches a previous one.

Why one module of ~300 lines: its steps (images, targets, objects, tables,
summary) share one worker pool and one row order, and together they are the
build_manifest stage's recipe.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap
from tqdm import tqdm

from jurassiglip.data import masks
from jurassiglip.data.decode import (IMAGE_CHUNK, MASK_CHUNK, OrderedMap, close_store, image_task, objects_task,
                                     process_map, resolve_workers, target_task)
from jurassiglip.data.manifest import (IMAGE_COLUMNS, IMAGE_MASKS_FILE, IMAGES_FILE, IMAGES_TABLE_FILE, KINDS,
                                       MASKS_FILE, SAMPLE_COLUMNS, SAMPLES_FILE, SUMMARY_FILE, mask_rows)
from jurassiglip.data.refs import DataError, RefDataset, Sample, read_refs
from jurassiglip.data.source import SourceFiles, resolve_source
from jurassiglip.data.tokenizer import build_word_tokenizer
from jurassiglip.runtime import atomic

if TYPE_CHECKING:
    from jurassiglip.config import Params

log = logging.getLogger(__name__)

MAX_BAD_IMAGES_LISTED = 100  # summary.json lists at most this many bad files by name


def _keep_first_rows(path: Path, n_rows: int) -> None:
    """Shrink a .npy file to its first n_rows rows (only needed when images were skipped)."""
    full = np.load(path, mmap_mode="r")
    short_path = path.with_name(path.stem + ".short.npy")
    short = open_memmap(short_path, mode="w+", dtype=full.dtype, shape=(n_rows, *full.shape[1:]))
    for start in range(0, n_rows, 256):  # chunks: the store can be many GB
        stop = min(start + 256, n_rows)
        short[start:stop] = full[start:stop]
    short.flush()
    del short, full
    os.replace(short_path, path)


def _write_images(
    dataset: RefDataset, images_dir: Path, out: Path, size: int, on_bad_image: str, ordered_map: OrderedMap
) -> tuple[list[int], list[dict], Counter]:
    """Read each image once into out/images.npy.

    Each image is decoded and written into its own row by a worker; results
    come back in row order, and rows of bad images are squeezed out after.

    Returns:
        (image_ids kept, in row order; bad images [{file_name, reason}];
        Counter of original modes that were converted to RGB).
    """
    image_ids = list(dataset.images)
    log.info("reading %d images from %s at %dx%d", len(image_ids), images_dir, size, size)
    path = out / IMAGES_FILE
    store = open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(image_ids), size, size, 3))
    store.flush()  # the header, before the workers write rows into the file
    row_bytes = size * size * 3
    kept_rows: list[int] = []
    kept: list[int] = []
    bad: list[dict] = []
    converted: Counter = Counter()
    tasks = ((images_dir / dataset.images[i].file_name, dataset.images[i], size, path, store.offset + row * row_bytes)
             for row, i in enumerate(image_ids))
    try:
        loaded = ordered_map(image_task, tasks, IMAGE_CHUNK)
        for row, (image_id, (ok, detail)) in enumerate(tqdm(zip(image_ids, loaded), total=len(image_ids),
                                                            desc="images", unit="img", disable=None)):
            info = dataset.images[image_id]
            if not ok:  # results come in row order: the first bad one here is the first in the file
                image_path = images_dir / info.file_name
                if on_bad_image == "fail":
                    raise DataError(f"{image_path}: {detail} (image_id {image_id}; "
                                    f"set on_bad_image=skip to drop it)")
                log.warning("skipping image %s: %s", image_path, detail)
                bad.append({"file_name": info.file_name, "image_id": image_id, "reason": detail})
                continue
            kept_rows.append(row)
            kept.append(image_id)
            if detail != "RGB":
                converted[detail] += 1
    finally:
        close_store(path)  # opened in this process when there is no pool
    for new, old in enumerate(kept_rows):  # rows stay dense: a skipped image takes no row
        if new != old:
            store[new] = store[old]
    store.flush()
    del store
    if len(kept) < len(image_ids):
        _keep_first_rows(path, len(kept))
    log.info("wrote %s: %d images (%d skipped, %d converted to RGB)", IMAGES_FILE, len(kept), len(bad),
             sum(converted.values()))
    return kept, bad, converted



def _write_target_masks(dataset: RefDataset, samples: list[Sample], out: Path, size: int,
                        ordered_map: OrderedMap) -> tuple[list[str], np.ndarray]:
    """Pack each ref's target at training size into out/masks.npy, one row per ref.

    Returns:
        (the target RLE counts at original size, one per sample;
        int32 (n_samples,) row of masks.npy per sample).
    """
    index = mask_rows([s.ref_id for s in samples])
    firsts = [samples[row] for row in np.flatnonzero(np.diff(index, prepend=-1))]  # first sentence of each ref
    log.info("computing target masks for %d refs (%d samples)", len(firsts), len(samples))
    store = open_memmap(out / MASKS_FILE, mode="w+", dtype=np.uint8,
                        shape=(len(firsts), masks.packed_length(size)))
    tasks = (([dataset.annotations[a].rle for a in s.ann_ids], dataset.images[s.image_id].height,
              dataset.images[s.image_id].width, size) for s in firsts)
    ref_counts: list[str] = []
    for row, (counts, bits) in enumerate(tqdm(ordered_map(target_task, tasks, MASK_CHUNK), total=len(firsts),
                                              desc="targets", unit="ref", disable=None)):
        ref_counts.append(counts)
        store[row] = bits
    store.flush()
    del store
    log.info("wrote %s: %d targets", MASKS_FILE, len(firsts))
    return [ref_counts[i] for i in index], index


def _write_object_masks(dataset: RefDataset, image_ids: list[int], out: Path, size: int,
                        ordered_map: OrderedMap) -> list[str]:
    """Pack each image's all-objects mask at training size into out/image_masks.npy.

    Returns:
        The all-objects RLE counts at original size, one per image.
    """
    store = open_memmap(out / IMAGE_MASKS_FILE, mode="w+", dtype=np.uint8,
                        shape=(len(image_ids), masks.packed_length(size)))
    tasks = (([dataset.annotations[a].rle for a in dataset.image_objects.get(i, ())], dataset.images[i].height,
              dataset.images[i].width, size) for i in image_ids)
    counts: list[str] = []
    for row, (rle_counts, bits) in enumerate(tqdm(ordered_map(objects_task, tasks, MASK_CHUNK),
                                                  total=len(image_ids), desc="objects", unit="img", disable=None)):
        counts.append(rle_counts)
        store[row] = bits
    store.flush()
    del store
    log.info("wrote %s: all-objects masks of %d images", IMAGE_MASKS_FILE, len(image_ids))
    return counts


def _frame(columns: dict[str, list], schema: dict[str, tuple[str, str]]) -> pd.DataFrame:
    data = {}
    for name, (dtype, _) in schema.items():
        values = columns[name]
        data[name] = pd.Series(values, dtype=object) if dtype == "str" else np.asarray(values, dtype=dtype)
    return pd.DataFrame(data)


def _samples_table(dataset: RefDataset, samples: list[Sample], image_index: dict[int, int],
                   rles: list[str], mask_index: np.ndarray) -> pd.DataFrame:
    images = [dataset.images[s.image_id] for s in samples]
    return _frame({
        "sample_id": list(range(len(samples))),
        "ref_id": [s.ref_id for s in samples],
        "sent_id": [s.sent_id for s in samples],
        "image_id": [s.image_id for s in samples],
        "image_index": [image_index[s.image_id] for s in samples],
        "mask_index": mask_index,
        "split": [s.split for s in samples],
        "sentence": [s.sentence for s in samples],
        "no_target": [s.no_target for s in samples],
        "n_targets": [len(s.ann_ids) for s in samples],
        "kind": [s.kind for s in samples],
        "novel": [s.novel for s in samples],
        "template": [s.template for s in samples],
        "height": [i.height for i in images],
        "width": [i.width for i in images],
        "mask_rle": rles,
    }, SAMPLE_COLUMNS)


def _images_table(dataset: RefDataset, image_ids: list[int], image_split: dict[int, str],
                  rles: list[str]) -> pd.DataFrame:
    infos = [dataset.images[i] for i in image_ids]
    return _frame({
        "image_index": list(range(len(image_ids))),
        "image_id": image_ids,
        "file_name": [i.file_name for i in infos],
        "split": [image_split[i] for i in image_ids],
        "height": [i.height for i in infos],
        "width": [i.width for i in infos],
        "objects_rle": rles,
    }, IMAGE_COLUMNS)


def _mode_counts(converted: Counter) -> dict[str, int]:
    """Counts by Pillow mode, keyed so they are valid MLflow metric names ("I;16" -> "I_16")."""
    return {re.sub(r"[^A-Za-z0-9_]", "_", mode): n for mode, n in sorted(converted.items())}


def _summary(dataset: RefDataset, samples: list[Sample], image_ids: list[int], bad: list[dict],
             converted: Counter, size: int, shared_images: int) -> dict:
    splits = list(dict.fromkeys(s.split for s in dataset.samples))  # file order, incl. emptied ones
    per_split = {sp: [s for s in samples if s.split == sp] for sp in splits}
    kinds = {sp: {k: sum(s.kind == k for s in ss) for k in KINDS} for sp, ss in per_split.items()}
    bad_ids = {b["image_id"] for b in bad}
    return {
        "image_size": size,
        "n_samples": len(samples),
        "n_images": len(image_ids),
        "samples_per_split": {sp: len(ss) for sp, ss in per_split.items()},
        "images_per_split": {sp: len({s.image_id for s in ss}) for sp, ss in per_split.items()},
        "kinds_per_split": kinds,
        "kind_shares_per_split": {
            sp: {k: round(n / max(1, len(per_split[sp])), 4) for k, n in kinds[sp].items()} for sp in splits
        },
        "novel_per_split": {sp: sum(s.novel for s in ss) for sp, ss in per_split.items()},
        "skipped": {
            **dataset.counts,
            "bad_images": len(bad),
            "bad_image_samples": sum(s.image_id in bad_ids for s in dataset.samples),
        },
        "bad_images": bad[:MAX_BAD_IMAGES_LISTED],
        "converted_images": {"total": sum(converted.values()), "by_mode": _mode_counts(converted)},
        "images_in_several_splits": shared_images,
    }


def _write_manifest(dataset: RefDataset, images_dir: Path, out: Path, size: int, on_bad_image: str,
                    workers: int) -> dict:
    """Write all manifest files into `out` (an empty temporary directory), decoding in `workers` processes."""
    with process_map(workers) as ordered_map:
        return _write_files(dataset, images_dir, out, size, on_bad_image, ordered_map)


def _write_files(dataset: RefDataset, images_dir: Path, out: Path, size: int, on_bad_image: str,
                 ordered_map: OrderedMap) -> dict:
    image_ids, bad, converted = _write_images(dataset, images_dir, out, size, on_bad_image, ordered_map)
    image_index = {image_id: row for row, image_id in enumerate(image_ids)}
    samples = [s for s in dataset.samples if s.image_id in image_index]
    for split in dict.fromkeys(s.split for s in dataset.samples):
        if not any(s.split == split for s in samples):
            raise DataError(
                f"{images_dir}: split '{split}' has no samples left after skipping {len(bad)} bad images"
            )

    # An image normally belongs to one split (gRefCOCO splits are by image);
    # if not, it is listed under the first split that uses it, and counted.
    image_splits: dict[int, list[str]] = {}
    for s in samples:
        image_splits.setdefault(s.image_id, [])
        if s.split not in image_splits[s.image_id]:
            image_splits[s.image_id].append(s.split)
    shared = sum(len(v) > 1 for v in image_splits.values())
    if shared:
        log.warning("%d images are used by several splits; images.parquet lists their first split", shared)

    target_rles, mask_index = _write_target_masks(dataset, samples, out, size, ordered_map)
    object_rles = _write_object_masks(dataset, image_ids, out, size, ordered_map)
    _samples_table(dataset, samples, image_index, target_rles, mask_index).to_parquet(out / SAMPLES_FILE,
                                                                                     index=False)
    first_split = {i: v[0] for i, v in image_splits.items()}
    _images_table(dataset, image_ids, first_split, object_rles).to_parquet(out / IMAGES_TABLE_FILE, index=False)
    log.info("wrote %s (%d rows) and %s (%d rows)", SAMPLES_FILE, len(samples), IMAGES_TABLE_FILE, len(image_ids))

    summary = _summary(dataset, samples, image_ids, bad, converted, size, shared)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build_manifest(
    dataset: RefDataset,
    images_dir: Path | str,
    out_dir: Path | str,
    *,
    image_size: int,
    on_bad_image: Literal["fail", "skip"],
    workers: int = 1,
) -> dict:
    """Write the manifest of `dataset` to `out_dir`, atomically.

    Args:
        dataset: output of `refs.read_refs`.
        images_dir: folder holding instances.json's `file_name`s.
        out_dir: manifest directory; replaced only once the new one is complete.
        image_size: training side S; images and masks are stretched to S x S.
        on_bad_image: "fail" raises DataError naming the first missing or
            unreadable image; "skip" drops it and all its samples, counted in
            summary["skipped"] and listed in summary["bad_images"].
        workers: processes decoding and resizing images and masks; 0 = one per
            core (`resolve_workers`), 1 = in this process. The files are
            byte-identical for any value.

    Returns:
        The summary dict, also written as summary.json.

    Raises:
        DataError: a bad image under "fail", or a split left without samples.
    """
    if on_bad_image not in ("fail", "skip"):
        raise ValueError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
    if image_size <= 0:
        raise ValueError(f"image_size must be > 0, got {image_size}")
    if not dataset.samples:
        raise DataError("the dataset has no samples to write")
    workers = min(resolve_workers(workers), len(dataset.images))
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    with atomic.atomic_dir(out_dir) as tmp:
        summary = _write_manifest(dataset, images_dir, tmp, image_size, on_bad_image, workers)
    log.info("manifest ready at %s: %d samples, %d images (%d worker process%s)", out_dir, summary["n_samples"],
             summary["n_images"], workers, "" if workers == 1 else "es")
    return summary




@dataclass(frozen=True)
class Inputs:
    """What `build_inputs` wrote and read."""

    source: SourceFiles  # the three input paths
    refs: RefDataset
    summary: dict      # the manifest's summary.json
    vocab_size: int    # of the word tokenizer built from the training captions


def build_inputs(params: Params, out: Path) -> Inputs:
    """The build_manifest stage's recipe: source -> refs -> manifest -> word tokenizer.

    Writes out/source (the generated set, or source.json naming the gRefCOCO
    files read), out/manifest and out/tokenizer; the stage, the tests' micro
    data and the benchmarks all build their inputs with it.
    """
    source = resolve_source(params, out / "source")
    refs = read_refs(source.grefs_path, source.instances_path, splits=params.data.splits,
                     max_refs_per_split=params.data.max_refs_per_split,
                     drop_no_target=params.data.drop_no_target,
                     required_splits=(params.data.train_split, params.data.val_split))
    summary = build_manifest(refs, source.images_dir, out / "manifest", image_size=params.model.arch.image_size,
                             on_bad_image=params.data.on_bad_image, workers=params.data.workers)
    train_captions = [s.sentence for s in refs.samples if s.split == params.data.train_split]
    vocab_size = build_word_tokenizer(train_captions, out / "tokenizer")
    return Inputs(source, refs, summary, vocab_size)
