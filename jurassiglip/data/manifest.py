"""The manifest: every sample, image and mask of a build in a few flat files.

`build_manifest` (build_manifest.py) writes a directory that training and
evaluation read without touching JSON or JPEGs again:

    samples.parquet    one row per sample (sentence); target RLE at original size, and
                       mask_index: its row of masks.npy
    images.parquet     one row per image; RLE of all its objects (text-blind baseline)
    images.npy         uint8 (n_images, S, S, 3), RGB, stretched to S x S
    masks.npy          uint8 (n_refs, ceil(S*S/8)), packed target masks at S x S, one row
                       per ref (its sentences share one target), in sample row order
    image_masks.npy    uint8 (n_images, ceil(S*S/8)), packed all-objects masks at S x S
    summary.json       counts per split / kind, and everything skipped or converted

This module owns that format (file names, column schemas, the mask row
rule) and reads it back: `Manifest.load` reopens a directory (arrays
memory-mapped) and checks that the tables and arrays still agree, so a
hand-edited file or a stale image store fails loudly at load time rather
than as a shape error mid-training.

Column names and file names are a contract with datasets, metrics and stages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from jurassiglip.data import masks
from jurassiglip.data.refs import DataError

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
    "template": ("str", "str"),   # the synthetic generator's caption template; "" for gRefCOCO
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
