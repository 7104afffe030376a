"""The manifest: every sample, image and mask of a build in a few flat files.

`build_manifest` turns a `RefDataset` (from `refs.read_refs`) into a directory
that training and evaluation read without touching JSON or JPEGs again:

    samples.parquet    one row per sample (sentence); target RLE at original size
    images.parquet     one row per image; RLE of all its objects (text-blind baseline)
    images.npy         uint8 (n_images, S, S, 3), RGB, stretched to S x S
    masks.npy          uint8 (n_samples, ceil(S*S/8)), packed target masks at S x S
    image_masks.npy    uint8 (n_images, ceil(S*S/8)), packed all-objects masks at S x S
    summary.json       counts per split / kind, and everything skipped or converted

The directory is written to a temporary sibling and renamed at the end, so a
failed build never leaves a half-written manifest nor touches a previous one.
`Manifest.load` reopens it (arrays memory-mapped) and checks that the tables
and arrays still agree, so a hand-edited file or a stale image store fails
loudly at load time rather than as a shape error mid-training.

Column names and file names are a contract with datasets, metrics and stages.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap
from PIL import Image
from tqdm import tqdm

from jurassiglip import atomic
from jurassiglip.data import masks
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

# Pillow opens 16-bit greyscale PNG/TIFF as one of these. Its own
# convert("RGB") clips values above 255 instead of rescaling, which would turn
# most of a 16-bit image white. "I" (32-bit) is assumed to hold 16-bit data,
# as it does when it comes from a 16-bit PNG.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
MAX_BAD_IMAGES_LISTED = 100  # summary.json lists at most this many bad files by name


class _BadImage(Exception):
    """An image that cannot be used; the message is the reason."""


# ---------------------------------------------------------------- images


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    1, L, P, RGBA, LA, CMYK, YCbCr... go through Pillow (alpha is dropped, not
    composited). 16-bit modes are rescaled 0..65535 -> 0..255 with rounding;
    float "F" images are clipped to 0..255.

    Args:
        image: a loaded PIL image of any mode.

    Returns:
        RGB PIL image of the same size.
    """
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        eight = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return Image.fromarray(eight).convert("RGB")
    if image.mode == "F":
        values = np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)
        return Image.fromarray(values).convert("RGB")
    return image.convert("RGB")


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
    dataset: RefDataset, images_dir: Path, out: Path, size: int, on_bad_image: str
) -> tuple[list[int], list[dict], Counter]:
    """Read each image once into out/images.npy.

    Returns:
        (image_ids kept, in row order; bad images [{file_name, reason}];
        Counter of original modes that were converted to RGB).
    """
    image_ids = list(dataset.images)
    log.info("reading %d images from %s at %dx%d", len(image_ids), images_dir, size, size)
    store = open_memmap(out / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=(len(image_ids), size, size, 3))
    kept: list[int] = []
    bad: list[dict] = []
    converted: Counter = Counter()
    for image_id in tqdm(image_ids, desc="images", unit="img", disable=None):
        info = dataset.images[image_id]
        path = images_dir / info.file_name
        try:
            pixels, mode = load_image(path, info, size)
        except _BadImage as e:
            if on_bad_image == "fail":
                raise DataError(f"{path}: {e} (image_id {image_id}; set on_bad_image=skip to drop it)") from None
            log.warning("skipping image %s: %s", path, e)
            bad.append({"file_name": info.file_name, "image_id": image_id, "reason": str(e)})
            continue
        store[len(kept)] = pixels  # rows stay dense: a skipped image takes no row
        kept.append(image_id)
        if mode != "RGB":
            converted[mode] += 1
    store.flush()
    del store
    if len(kept) < len(image_ids):
        _keep_first_rows(out / IMAGES_FILE, len(kept))
    log.info("wrote %s: %d images (%d skipped, %d converted to RGB)", IMAGES_FILE, len(kept), len(bad),
             sum(converted.values()))
    return kept, bad, converted


# ---------------------------------------------------------------- masks and tables


def _target_rle(dataset: RefDataset, sample: Sample, info: ImageInfo) -> dict:
    rles = [dataset.annotations[a].rle for a in sample.ann_ids]
    if len(rles) == 1:
        return rles[0]  # already compressed at original size: no decode needed
    return masks.encode(masks.union(rles, info.height, info.width))


def _write_target_masks(dataset: RefDataset, samples: list[Sample], out: Path, size: int) -> list[str]:
    """Pack every sample's target at training size into out/masks.npy.

    Returns:
        The target RLE counts at original size, one per sample.
    """
    log.info("computing target masks for %d samples", len(samples))
    store = open_memmap(out / MASKS_FILE, mode="w+", dtype=np.uint8,
                        shape=(len(samples), masks.packed_length(size)))
    counts: list[str] = []
    last_ref, last = None, None
    for row, sample in enumerate(samples):
        if sample.ref_id != last_ref:  # sentences of a ref share one target: compute once
            info = dataset.images[sample.image_id]
            rle = _target_rle(dataset, sample, info)
            last = (rle["counts"], masks.pack(masks.resize_mask(masks.decode(rle), size)))
            last_ref = sample.ref_id
        counts.append(last[0])
        store[row] = last[1]
    store.flush()
    del store
    log.info("wrote %s", MASKS_FILE)
    return counts


def _write_object_masks(dataset: RefDataset, image_ids: list[int], out: Path, size: int) -> list[str]:
    """Pack each image's all-objects mask at training size into out/image_masks.npy.

    Returns:
        The all-objects RLE counts at original size, one per image.
    """
    store = open_memmap(out / IMAGE_MASKS_FILE, mode="w+", dtype=np.uint8,
                        shape=(len(image_ids), masks.packed_length(size)))
    counts: list[str] = []
    for row, image_id in enumerate(image_ids):
        info = dataset.images[image_id]
        rles = [dataset.annotations[a].rle for a in dataset.image_objects.get(image_id, ())]
        mask = masks.union(rles, info.height, info.width)
        counts.append(masks.encode(mask)["counts"])
        store[row] = masks.pack(masks.resize_mask(mask, size))
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
                   rles: list[str]) -> pd.DataFrame:
    images = [dataset.images[s.image_id] for s in samples]
    return _frame({
        "sample_id": list(range(len(samples))),
        "ref_id": [s.ref_id for s in samples],
        "sent_id": [s.sent_id for s in samples],
        "image_id": [s.image_id for s in samples],
        "image_index": [image_index[s.image_id] for s in samples],
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


def _write_manifest(dataset: RefDataset, images_dir: Path, out: Path, size: int, on_bad_image: str) -> dict:
    """Write all manifest files into `out` (an empty temporary directory)."""
    image_ids, bad, converted = _write_images(dataset, images_dir, out, size, on_bad_image)
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

    target_rles = _write_target_masks(dataset, samples, out, size)
    object_rles = _write_object_masks(dataset, image_ids, out, size)
    _samples_table(dataset, samples, image_index, target_rles).to_parquet(out / SAMPLES_FILE, index=False)
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
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    with atomic.atomic_dir(out_dir) as tmp:
        summary = _write_manifest(dataset, images_dir, tmp, image_size, on_bad_image)
    log.info("manifest ready at %s: %d samples, %d images", out_dir, summary["n_samples"], summary["n_images"])
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
    """Memory-map a .npy file and check dtype uint8, row count and trailing shape."""
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
    """

    root: Path
    samples: pd.DataFrame
    images_table: pd.DataFrame
    images: np.ndarray
    image_size: int
    target_bits: np.ndarray  # uint8 (n_samples, ceil(S*S/8))
    object_bits: np.ndarray  # uint8 (n_images, ceil(S*S/8))

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
        target_bits = _load_array(root / MASKS_FILE, len(samples), SAMPLES_FILE, packed)
        object_bits = _load_array(root / IMAGE_MASKS_FILE, len(images_table), IMAGES_TABLE_FILE, packed)
        _check_indices(samples, images_table, root)
        log.info("loaded manifest %s: %d samples, %d images at %dx%d", root, len(samples), len(images_table),
                 size, size)
        return cls(root, samples, images_table, images, size, target_bits, object_bits)

    def target_mask(self, sample_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Target masks at training size.

        Args:
            sample_ids: n sample ids (= rows of `samples`).

        Returns:
            bool (n, S, S).
        """
        rows = np.atleast_1d(np.asarray(sample_ids, dtype=np.int64))
        return masks.unpack(self.target_bits[rows], self.image_size)

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
