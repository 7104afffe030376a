"""The manifest: every sample, image and mask of a build in a few flat files.

`build_manifest` turns a `RefDataset` (from `refs.read_refs`) into a directory
that training and evaluation read without touching JSON or JPEGs again:

    samples.parquet    one row per sample (sentence); target RLE at original size, and
                       mask_index: its row of masks.npy
    images.parquet     one row per image; RLE of all its objects (text-blind baseline)
    images.npy         uint8 (n_images, S, S, 3), RGB, stretched to S x S
    masks.npy          uint8 (n_refs, ceil(S*S/8)), packed target masks at S x S, one row
                       per ref (its sentences share one target), in sample row order
    image_masks.npy    uint8 (n_images, ceil(S*S/8)), packed all-objects masks at S x S
    summary.json       counts per split / kind, and everything skipped or converted

Decoding and resizing (images, then target and all-objects masks) run in
`workers` processes; results come back in row order, so the files are
byte-identical for any worker count.

The directory is written to a temporary sibling and renamed at the end, so a
failed build never leaves a half-written manifest nor touches a previous one.
`Manifest.load` reopens it (arrays memory-mapped) and checks that the tables
and arrays still agree, so a hand-edited file or a stale image store fails
loudly at load time rather than as a shape error mid-training.

Column names and file names are a contract with datasets, metrics and stages.

Why one long module: the manifest's format (file names, column schemas) has one owner, so the
writer and the reader that must agree on it live together. Splitting the writer (decoding in worker
processes) from the reader is the next step when either grows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap
from PIL import Image
from tqdm import tqdm

from jurassiglip.runtime import atomic
from jurassiglip.data import masks
from jurassiglip.data.images import to_rgb
from jurassiglip.data.refs import DataError, ImageInfo, RefDataset, Sample

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.parquet"
IMAGES_TABLE_FILE = "images.parquet"
IMAGES_FILE = "images.npy"
MASKS_FILE = "masks.npy"
IMAGE_MASKS_FILE = "image_masks.npy"
SUMMARY_FILE = "summary.json"

KINDS = ("single", "multi", "no_target")

# Column -> (numpy dtype written, dtype kind checked at load). Strings are
# written as Python str and come back as pandas' string dtype.
SAMPLE_COLUMNS: dict[str, tuple[str, str]] = {
    "sample_id": ("int64", "int"),
    "ref_id": ("int64", "int"),
    "sent_id": ("int64", "int"),
    "image_id": ("int64", "int"),
    "image_index": ("int32", "int"),
    "mask_index": ("int32", "int"),  # row of masks.npy: 0, 1, ... numbering the refs in row order
    "split": ("str", "str"),
    "sentence": ("str", "str"),
    "no_target": ("bool", "bool"),
    "n_targets": ("int16", "int"),
    "kind": ("str", "str"),
    "novel": ("bool", "bool"),
    "height": ("int32", "int"),
    "width": ("int32", "int"),
    "mask_rle": ("str", "str"),
}
IMAGE_COLUMNS: dict[str, tuple[str, str]] = {
    "image_index": ("int32", "int"),
    "image_id": ("int64", "int"),
    "file_name": ("str", "str"),
    "split": ("str", "str"),
    "height": ("int32", "int"),
    "width": ("int32", "int"),
    "objects_rle": ("str", "str"),
}

MAX_BAD_IMAGES_LISTED = 100  # summary.json lists at most this many bad files by name
# Tasks per hand-out to a worker: big enough that pickling and queueing stay
# small next to the work (an image is ~5 ms at COCO sizes, a mask ~2-3 ms),
# small enough that the pool stays busy to the end and memory stays flat.
IMAGE_CHUNK = 8
MASK_CHUNK = 32


class _BadImage(Exception):
    """An image that cannot be used; the message is the reason."""


# ---------------------------------------------------------------- images


def load_image(path: Path, info: ImageInfo, size: int) -> tuple[np.ndarray, str]:
    """Read one image, check it against instances.json, make it RGB and resize it.

    Pixels are used as stored (no EXIF rotation), as the COCO masks are; the
    size check catches an image whose stored size disagrees with its masks.

    Args:
        path: image file.
        info: its instances.json entry (expected height and width).
        size: output side S (bilinear, aspect ratio not kept).

    Returns:
        (uint8 array (S, S, 3), original Pillow mode).

    Raises:
        _BadImage: missing, truncated, undecodable, or of the wrong size.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now so a truncated file fails here, not later
            if (image.height, image.width) != (info.height, info.width):
                raise _BadImage(
                    f"size {image.height}x{image.width} (HxW) differs from instances.json "
                    f"{info.height}x{info.width}"
                )
            mode = image.mode
            rgb = to_rgb(image).resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8), mode
    except FileNotFoundError:
        raise _BadImage("file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _BadImage(f"unreadable image: {e}") from None


def resolve_workers(workers: int) -> int:
    """Worker processes for a `data.workers` value: 0 means one per core this process may use.

    Args:
        workers: >= 0.

    Returns:
        >= 1.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = one per core), got {workers}")
    if workers:
        return workers
    try:
        return len(os.sched_getaffinity(0))  # honours taskset / cgroup CPU pinning
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


OrderedMap = Callable[[Callable, Iterable, int], Iterator]


@contextlib.contextmanager
def _process_map(workers: int) -> Iterator[OrderedMap]:
    """Yield `ordered_map(fn, items, chunksize)`: fn over items in `workers` processes, results in order.

    One worker maps in this process (no pool). Otherwise the pool starts by
    forkserver where available (spawn elsewhere): no inherited threads or
    locks from the stage process, and the server imports the caller's main
    module and this one once for all workers. As with any forkserver/spawn
    pool, a script that builds with workers > 1 needs the
    `if __name__ == "__main__":` guard (stages and benchmarks have it).
    `fn` must be a module-level function. Leaving the block, even on an
    error, terminates the workers.
    """
    if workers <= 1:
        yield lambda fn, items, chunksize: map(fn, items)
        return
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["__main__", __name__])
    with context.Pool(workers) as pool:
        yield lambda fn, items, chunksize: pool.imap(fn, items, chunksize)


# File descriptors of the .npy stores this process writes rows into, by path:
# a worker opens images.npy once for all its tasks and its copy closes when
# the pool ends; the building process closes its own after the step.
_OPEN_STORES: dict[Path, int] = {}


def _write_at(store_path: Path, offset: int, data: np.ndarray) -> None:
    """Write a C-contiguous array's bytes at `offset` of a file (pwrite: no page faults, unlike a memmap)."""
    if store_path not in _OPEN_STORES:
        _OPEN_STORES[store_path] = os.open(store_path, os.O_WRONLY)
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while view:
        written = os.pwrite(_OPEN_STORES[store_path], view, offset)
        view, offset = view[written:], offset + written


def _close_store(store_path: Path) -> None:
    fd = _OPEN_STORES.pop(store_path, None)
    if fd is not None:
        os.close(fd)


def _image_task(task: tuple[Path, ImageInfo, int, Path, int]) -> tuple[bool, str]:
    """Worker: `load_image` into its row of images.npy, reporting a bad image instead of raising.

    The pixels go straight into the file: sending 0.8 MB per 512 px image
    back through a pipe cost the building process 1.5-2 ms per image, a
    third of a worker's decoding time, and it would not scale to 16 workers.

    Args:
        task: (image file, its instances.json entry, side S, images.npy path,
            byte offset of the image's row in it).

    Returns:
        (True, original Pillow mode), or (False, why the image is bad).
    """
    path, info, size, store_path, offset = task
    try:
        pixels, mode = load_image(path, info, size)
    except _BadImage as e:
        return False, str(e)
    _write_at(store_path, offset, pixels)
    return True, mode


def _target_task(task: tuple[list[dict], int, int, int]) -> tuple[str, np.ndarray]:
    """Worker: one ref's target from its annotations' RLEs (none for no-target).

    Args:
        task: (RLEs at original size, H, W, S).

    Returns:
        (RLE counts of the union at original size, uint8 (ceil(S*S/8),) packed at S x S).
    """
    rles, height, width, size = task
    if len(rles) == 1:
        rle = rles[0]  # already compressed at original size: kept as is
        mask = masks.decode(rle)
    else:
        mask = masks.union(rles, height, width)
        rle = masks.encode(mask)
    return rle["counts"], masks.pack(masks.resize_mask(mask, size))


def _objects_task(task: tuple[list[dict], int, int, int]) -> tuple[str, np.ndarray]:
    """Worker: one image's all-objects mask, as `_target_task` but always re-encoded."""
    rles, height, width, size = task
    mask = masks.union(rles, height, width)
    return masks.encode(mask)["counts"], masks.pack(masks.resize_mask(mask, size))


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
        loaded = ordered_map(_image_task, tasks, IMAGE_CHUNK)
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
        _close_store(path)  # opened in this process when there is no pool
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


# ---------------------------------------------------------------- masks and tables


def mask_rows(ref_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Row of masks.npy for each sample: the refs numbered 0, 1, ... in sample row order.

    The sentences of a ref are consecutive rows (refs.read_refs) and share
    one target, so a new row starts wherever ref_id changes.

    Args:
        ref_ids: (n_samples,) ref_id per sample, in row order.

    Returns:
        int32 (n_samples,); its last value + 1 is the number of masks.npy rows.
    """
    ref_ids = np.asarray(ref_ids)
    if len(ref_ids) == 0:
        return np.zeros(0, dtype=np.int32)
    starts = np.concatenate(([0], (ref_ids[1:] != ref_ids[:-1]).astype(np.int32)))
    return np.cumsum(starts, dtype=np.int32)


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
    for row, (counts, bits) in enumerate(tqdm(ordered_map(_target_task, tasks, MASK_CHUNK), total=len(firsts),
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
    for row, (rle_counts, bits) in enumerate(tqdm(ordered_map(_objects_task, tasks, MASK_CHUNK),
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
    with _process_map(workers) as ordered_map:
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


# ---------------------------------------------------------------- loading


def _read_table(path: Path, schema: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """Read a parquet table and check its columns against the schema."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (is this a manifest directory?)")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for a broken file
        raise DataError(f"{path}: cannot read parquet: {e}") from None
    checks = {
        "int": pd.api.types.is_integer_dtype,
        "bool": pd.api.types.is_bool_dtype,
        "str": lambda d: pd.api.types.is_string_dtype(d) or pd.api.types.is_object_dtype(d),
    }
    for column, (_, kind) in schema.items():
        if column not in df.columns:
            raise DataError(f"{path}: missing column '{column}'")
        dtype = df[column].dtype
        if not checks[kind](dtype):
            raise DataError(f"{path}: column '{column}' has dtype {dtype}, expected {kind}")
        if kind == "str" and not df[column].map(lambda v: isinstance(v, str)).all():
            raise DataError(f"{path}: column '{column}' must hold only strings (found nulls or other values)")
    return df


def _load_array(path: Path, rows: int, rows_from: str, shape_tail: tuple[int, ...] | None) -> np.ndarray:
    """Memory-map a .npy file and check dtype uint8, row count and trailing shape.

    `rows_from` says where `rows` comes from, as "<rows_from> has <rows> rows" reads.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: cannot read .npy: {e}") from None
    if array.dtype != np.uint8:
        raise DataError(f"{path}: dtype {array.dtype}, expected uint8")
    if array.ndim == 0 or array.shape[0] != rows:
        raise DataError(f"{path}: shape {array.shape} has {array.shape[0] if array.ndim else 0} rows "
                        f"but {rows_from} has {rows} rows")
    if shape_tail is not None and tuple(array.shape[1:]) != shape_tail:
        raise DataError(f"{path}: shape {array.shape}, expected (rows, {', '.join(map(str, shape_tail))})")
    return array


def _check_mask_index(samples: pd.DataFrame, root: Path) -> int:
    """Check that samples.parquet's mask_index numbers the refs 0, 1, ... in row order.

    Returns:
        The number of target rows masks.npy must have (max(mask_index) + 1, i.e. the refs).
    """
    index = samples["mask_index"].to_numpy()
    expected = mask_rows(samples["ref_id"].to_numpy())
    wrong = np.flatnonzero(index != expected)
    if len(wrong):
        row = int(wrong[0])
        raise DataError(
            f"{root / SAMPLES_FILE}: column 'mask_index' must number the refs 0, 1, ... in row order (one "
            f"{MASKS_FILE} row per ref_id); row {row} has {index[row]}, expected {expected[row]}"
        )
    return int(expected[-1]) + 1 if len(expected) else 0


def _check_indices(samples: pd.DataFrame, images_table: pd.DataFrame, root: Path) -> None:
    """Cross-check the two tables: row ids, image_index range, image ids, kinds."""
    sp, ip = root / SAMPLES_FILE, root / IMAGES_TABLE_FILE
    if not np.array_equal(samples["sample_id"].to_numpy(), np.arange(len(samples))):
        raise DataError(f"{sp}: column 'sample_id' must equal the row number 0..{len(samples) - 1}")
    if not np.array_equal(images_table["image_index"].to_numpy(), np.arange(len(images_table))):
        raise DataError(f"{ip}: column 'image_index' must equal the row number 0..{len(images_table) - 1}")
    index = samples["image_index"].to_numpy()
    if len(index) and (index.min() < 0 or index.max() >= len(images_table)):
        raise DataError(f"{sp}: column 'image_index' has values outside 0..{len(images_table) - 1}")
    if not np.array_equal(images_table["image_id"].to_numpy()[index], samples["image_id"].to_numpy()):
        raise DataError(
            f"{sp}: column 'image_id' disagrees with {ip} column 'image_id' at the rows given by 'image_index' "
            f"(tables from different builds?)"
        )
    unknown = set(samples["kind"].unique()) - set(KINDS)
    if unknown:
        raise DataError(f"{sp}: column 'kind' has unknown values {sorted(unknown)}; expected {list(KINDS)}")


@dataclass
class Manifest:
    """A built manifest, opened for reading (arrays are memory-mapped, read-only).

    samples: samples.parquet; row i has sample_id i.
    images_table: images.parquet; row i has image_index i.
    images: uint8 (n_images, S, S, 3) memory map of images.npy.
    image_size: S.
    target_bits: masks.npy, one row per ref; samples' column mask_index picks the row.
    """

    root: Path
    samples: pd.DataFrame
    images_table: pd.DataFrame
    images: np.ndarray
    image_size: int
    target_bits: np.ndarray  # uint8 (n_refs, ceil(S*S/8)), row samples.mask_index[sample_id]
    object_bits: np.ndarray  # uint8 (n_images, ceil(S*S/8))
    mask_index: np.ndarray = field(init=False, repr=False)  # int64 (n_samples,): row of target_bits per sample

    @classmethod
    def load(cls, root: Path | str, image_size: int | None = None, size_from: str = "the model") -> "Manifest":
        """Open and validate a manifest directory.

        Args:
            image_size: the side S the caller's model takes, if it must match (a
                manifest built for another size would train on the wrong masks).
            size_from: where `image_size` comes from, for the message (e.g. a params key).

        Raises:
            DataError: a missing file, column or dtype, tables and arrays out of
                sync, or images of another size; the message names the file and
                the column or shape.
        """
        root = Path(root)
        samples = _read_table(root / SAMPLES_FILE, SAMPLE_COLUMNS)
        images_table = _read_table(root / IMAGES_TABLE_FILE, IMAGE_COLUMNS)
        images = _load_array(root / IMAGES_FILE, len(images_table), IMAGES_TABLE_FILE, None)
        if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3:
            raise DataError(f"{root / IMAGES_FILE}: shape {images.shape}, expected (n_images, S, S, 3)")
        size = int(images.shape[1])
        if image_size is not None and size != image_size:
            raise DataError(f"{root / IMAGES_FILE}: images are {size}x{size} but {size_from} is {image_size}: "
                            f"the manifest is stale, rebuild it (dvc repro build_manifest)")
        packed = (masks.packed_length(size),)
        n_targets = _check_mask_index(samples, root)
        target_bits = _load_array(root / MASKS_FILE, n_targets, f"{SAMPLES_FILE} column 'mask_index' (max + 1)",
                                  packed)
        object_bits = _load_array(root / IMAGE_MASKS_FILE, len(images_table), IMAGES_TABLE_FILE, packed)
        _check_indices(samples, images_table, root)
        log.info("loaded manifest %s: %d samples, %d images, %d targets at %dx%d", root, len(samples),
                 len(images_table), n_targets, size, size)
        return cls(root, samples, images_table, images, size, target_bits, object_bits)

    def __post_init__(self) -> None:
        self.mask_index = self.samples["mask_index"].to_numpy(np.int64)

    def target_mask(self, sample_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Target masks at training size.

        Args:
            sample_ids: n sample ids (= rows of `samples`).

        Returns:
            bool (n, S, S).
        """
        rows = np.atleast_1d(np.asarray(sample_ids, dtype=np.int64))
        return masks.unpack(self.target_bits[self.mask_index[rows]], self.image_size)

    def objects_mask(self, image_indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """All-objects masks (text-blind baseline) at training size.

        Args:
            image_indices: n image indices (= rows of `images_table`).

        Returns:
            bool (n, S, S).
        """
        rows = np.atleast_1d(np.asarray(image_indices, dtype=np.int64))
        return masks.unpack(self.object_bits[rows], self.image_size)

    def original_target(self, sample_id: int) -> np.ndarray:
        """Target of one sample at original resolution, bool (H, W)."""
        row = self.samples.iloc[int(sample_id)]
        return masks.decode(masks.rle_from_counts(row["mask_rle"], row["height"], row["width"]))

    def original_objects(self, image_index: int) -> np.ndarray:
        """All-objects mask of one image at original resolution, bool (H, W)."""
        row = self.images_table.iloc[int(image_index)]
        return masks.decode(masks.rle_from_counts(row["objects_rle"], row["height"], row["width"]))

    def split(self, name: str) -> pd.DataFrame:
        """Samples of one split (index = sample_id).

        Raises:
            DataError: the split has no samples; the message lists those present.
        """
        rows = self.samples[self.samples["split"] == name]
        if rows.empty:
            present = ", ".join(self.samples["split"].unique())
            raise DataError(f"{self.root / SAMPLES_FILE}: no samples in split '{name}'; splits present: {present}")
        return rows
