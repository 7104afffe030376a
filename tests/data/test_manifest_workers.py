"""build_manifest in worker processes, and target masks stored once per ref.

The files must not depend on the worker count (byte for byte, bad images
included), and `Manifest.target_mask` must give every sample its ref's
target, checked against pycocotools on the raw annotations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jurassiglip.data import masks
from jurassiglip.data.build_manifest import build_manifest
from jurassiglip.data.decode import IMAGE_CHUNK, MASK_CHUNK, resolve_workers
from jurassiglip.data.manifest import Manifest
from jurassiglip.data.refs import DataError, read_refs
from jurassiglip.data.synthetic import generate

S = 32
N_IMAGES = {"train": 30, "val": 10}  # 5 image chunks and several mask chunks: both workers get work


class Annotations:
    """`ann(id)` over a generated instances.json, what the pycocotools reference (`reference_union`) reads."""

    def __init__(self, instances_path: Path):
        self._by_id = {a["id"]: a for a in json.loads(instances_path.read_text())["annotations"]}

    def ann(self, ann_id: int) -> dict:
        return self._by_id[ann_id]


@pytest.fixture
def shapes(tmp_path):
    files = generate(tmp_path / "shapes", seed=1, n_images=N_IMAGES, min_objects=2, max_objects=5, min_side=64,
                     max_side=96, refs_per_image=6, no_target_share=0.2,
                     novel_combos=["red triangle"], rle_share=0.5)
    return files


def _dataset(files):
    return read_refs(files.grefs_path, files.instances_path, splits=list(N_IMAGES), max_refs_per_split=0,
                     drop_no_target=False)


def _build(files, out, workers, on_bad_image="fail"):
    return build_manifest(_dataset(files), files.images_dir, out, image_size=S, on_bad_image=on_bad_image,
                          workers=workers)


def _contents(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def _image_order(files) -> list[str]:
    """File names in images.npy row order (first use by the refs, as read_refs keeps them)."""
    return [info.file_name for info in _dataset(files).images.values()]


def test_enough_work_for_several_chunks(shapes):
    dataset = _dataset(shapes)
    assert len(dataset.images) >= 4 * IMAGE_CHUNK
    assert len({s.ref_id for s in dataset.samples}) >= 4 * MASK_CHUNK


def test_one_and_two_workers_write_identical_files(shapes, tmp_path):
    one = _build(shapes, tmp_path / "one", workers=1)
    two = _build(shapes, tmp_path / "two", workers=2)
    assert one == two
    a, b = _contents(tmp_path / "one"), _contents(tmp_path / "two")
    assert list(a) == ["image_masks.npy", "images.npy", "images.parquet", "masks.npy", "samples.parquet",
                       "summary.json"]
    for name in a:
        assert a[name] == b[name], name


def test_bad_images_are_handled_alike_by_any_worker_count(shapes, tmp_path):
    order = _image_order(shapes)
    first, later = order[3], order[2 * IMAGE_CHUNK + 1]  # different chunks, so different workers
    (shapes.images_dir / later).unlink()
    path = shapes.images_dir / first
    path.write_bytes(path.read_bytes()[:200])  # truncated JPEG

    for workers in (1, 2):  # fail names the first bad image in row order, whoever decoded it
        with pytest.raises(DataError) as err:
            _build(shapes, tmp_path / f"failed{workers}", workers)
        assert first in str(err.value) and later not in str(err.value)
        assert not (tmp_path / f"failed{workers}").exists()

    one = _build(shapes, tmp_path / "one", 1, on_bad_image="skip")
    two = _build(shapes, tmp_path / "two", 2, on_bad_image="skip")
    assert [b["file_name"] for b in one["bad_images"]] == [first, later]
    assert one == two and _contents(tmp_path / "one") == _contents(tmp_path / "two")


def test_target_masks_one_row_per_ref_and_every_sample_gets_its_refs_target(shapes, tmp_path, reference_union):
    _build(shapes, tmp_path / "manifest", workers=2)
    m = Manifest.load(tmp_path / "manifest")
    refs = {r["ref_id"]: r for r in json.loads(shapes.grefs_path.read_text())}
    samples = m.samples

    stored = np.load(tmp_path / "manifest" / "masks.npy")
    assert stored.shape == (len(refs), masks.packed_length(S))  # every generated ref is kept
    assert samples["ref_id"].nunique() == len(refs) < len(samples)  # some refs have 2 sentences
    by_ref = samples.groupby("ref_id")["mask_index"]
    assert (by_ref.nunique() == 1).all() and by_ref.first().is_unique

    anns = Annotations(shapes.instances_path)
    expected = np.stack([
        masks.resize_mask(reference_union(anns, [a for a in refs[row.ref_id]["ann_id"] if a != -1],
                                          row.height, row.width), S)
        for row in samples.itertuples()
    ])  # (n_samples, S, S), from the raw annotations by pycocotools
    np.testing.assert_array_equal(m.target_mask(samples["sample_id"].to_numpy()), expected)
    rows = np.array([5, 0, 5, len(samples) - 1])  # any order, repeats
    np.testing.assert_array_equal(m.target_mask(rows), expected[rows])
    np.testing.assert_array_equal(m.target_mask(7), expected[7:8])


def test_tiny_targets_match_mask_rle_and_share_rows(tiny, tmp_path):
    splits = ["train", "val", "testA", "testB"]
    dataset = read_refs(tiny.grefs_path, tiny.instances_path, splits=splits, max_refs_per_split=0,
                        drop_no_target=False)
    build_manifest(dataset, tiny.images_dir, tmp_path / "manifest", image_size=S, on_bad_image="fail", workers=2)
    m = Manifest.load(tmp_path / "manifest")
    assert m.target_bits.shape[0] == 10  # refs 1-10; ref 11 is in an unlisted split
    assert m.samples["mask_index"].tolist() == [0, 0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9]  # refs 1 and 5: 2 sentences
    for row in m.samples.itertuples():
        original = masks.decode(masks.rle_from_counts(row.mask_rle, row.height, row.width))
        np.testing.assert_array_equal(m.target_mask([row.sample_id])[0], masks.resize_mask(original, S))


def test_resolve_workers():
    assert resolve_workers(0) == len(os.sched_getaffinity(0))
    assert resolve_workers(3) == 3
    with pytest.raises(ValueError, match="workers must be >= 0"):
        resolve_workers(-1)
