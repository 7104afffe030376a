"""build_manifest / Manifest.load: round trip, image modes, bad images, atomic writes, load-time checks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jurassiglip.data.build_manifest import build_manifest
from jurassiglip.data.images import to_rgb
from jurassiglip.data.manifest import Manifest
from jurassiglip.data.refs import DataError, read_refs

SPLITS = ["train", "val", "testA", "testB"]
S = 16


def _dataset(data):
    return read_refs(data.grefs_path, data.instances_path, splits=SPLITS, max_refs_per_split=0, drop_no_target=False)


def _build(data, out, on_bad_image="fail"):
    return build_manifest(_dataset(data), data.images_dir, out, image_size=S, on_bad_image=on_bad_image)


def _expected_rgb(path):
    """Independent reference for one stored image: Pillow conversion, 16-bit scaled by hand."""
    with Image.open(path) as im:
        if im.mode == "I;16":
            im = Image.fromarray(np.round(np.asarray(im) / 257.0).astype(np.uint8))
        return np.asarray(im.convert("RGB").resize((S, S), Image.Resampling.BILINEAR))


def reference_resize(mask):
    """Independent reference for a stored training-size mask: torch's antialiased bilinear resize (the filter
    Pillow uses, which the manifest calls through masks.resize_mask), then >= 0.5."""
    grid = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(grid, size=(S, S), mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy() >= 0.5


def test_round_trip_masks_and_images(tiny, tmp_path, reference_union):
    summary = _build(tiny, tmp_path / "manifest")
    m = Manifest.load(tmp_path / "manifest")
    assert m.image_size == S and len(m.samples) == summary["n_samples"] == 12
    assert m.images.shape == (6, S, S, 3) and m.images.dtype == np.uint8

    for row in m.samples.itertuples():
        raw = tiny.ref(row.ref_id)["ann_id"]
        expected = reference_union(tiny, [] if raw == [-1] else raw, row.height, row.width)
        np.testing.assert_array_equal(m.original_target(row.sample_id), expected)
        np.testing.assert_array_equal(m.target_mask([row.sample_id])[0], reference_resize(expected))
        assert row.kind == ("no_target" if raw == [-1] else "single" if row.n_targets == 1 else "multi")
    assert m.target_mask(np.arange(3)).shape == (3, S, S)

    for row in m.images_table.itertuples():
        ann_ids = [a["id"] for a in tiny.instances["annotations"] if a["image_id"] == row.image_id]
        expected = reference_union(tiny, ann_ids, row.height, row.width)  # crowd/degenerate left out
        np.testing.assert_array_equal(m.original_objects(row.image_index), expected)
        np.testing.assert_array_equal(m.objects_mask([row.image_index])[0], reference_resize(expected))
        np.testing.assert_array_equal(m.images[row.image_index], _expected_rgb(tiny.images_dir / row.file_name))


def test_every_mode_becomes_rgb(tiny, tmp_path):
    summary = _build(tiny, tmp_path / "manifest")
    m = Manifest.load(tmp_path / "manifest")
    by_file = dict(zip(m.images_table["file_name"], m.images_table["image_index"]))
    gray = m.images[by_file["gray.png"]]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    deep = m.images[by_file["deep.png"]]
    assert (deep[:, :4] == 255).all() and (deep[:, -4:] == 128).all()  # 65535 -> 255, 32896 -> 128
    assert summary["converted_images"] == {"total": 5, "by_mode": {"CMYK": 1, "I_16": 1, "L": 1, "P": 1, "RGBA": 1}}


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGBA", "LA", "CMYK", "YCbCr", "I", "F"])
def test_to_rgb_handles_modes(mode):
    rgb = to_rgb(Image.new("RGB", (5, 3), (200, 100, 50)).convert(mode))
    assert rgb.mode == "RGB" and rgb.size == (5, 3)


def test_to_rgb_rescales_16_bit():
    deep = Image.fromarray(np.array([[0, 257, 51400, 65535]], dtype=np.uint16))
    assert deep.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(to_rgb(deep))[0, :, 0], [0, 1, 200, 255])


def test_summary_counts(tiny, tmp_path):
    summary = _build(tiny, tmp_path / "manifest")
    assert summary == json.loads((tmp_path / "manifest" / "summary.json").read_text())
    assert summary["samples_per_split"] == {"train": 5, "val": 4, "testA": 1, "testB": 2}
    assert summary["images_per_split"] == {"train": 2, "val": 2, "testA": 1, "testB": 1}
    assert summary["kinds_per_split"]["train"] == {"single": 2, "multi": 2, "no_target": 1}
    assert summary["kind_shares_per_split"]["testB"] == {"single": 0.5, "multi": 0.0, "no_target": 0.5}
    assert summary["novel_per_split"] == {"train": 0, "val": 2, "testA": 0, "testB": 0}
    skipped = summary["skipped"]
    assert skipped["crowd_anns_skipped"] == 1 and skipped["degenerate_polygon_parts"] == 2
    assert skipped["bad_images"] == 0 and skipped["bad_image_samples"] == 0
    assert summary["images_in_several_splits"] == 0


def _remove_gray(data):
    (data.images_dir / "gray.png").unlink()
    return "gray.png", 1  # file, samples lost (ref 4; ref 11 is in an unlisted split)


def _truncate_rgb(data):
    path = data.images_dir / "rgb.jpg"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])
    return "rgb.jpg", 4  # refs 1 (2 sentences), 2, 3


@pytest.mark.parametrize("damage", [_remove_gray, _truncate_rgb], ids=["missing", "truncated"])
def test_bad_image_fail_and_skip(tiny, tmp_path, damage):
    file_name, lost = damage(tiny)
    with pytest.raises(DataError, match=file_name):
        _build(tiny, tmp_path / "failed")
    assert not (tmp_path / "failed").exists()

    summary = _build(tiny, tmp_path / "skipped", on_bad_image="skip")
    assert summary["skipped"]["bad_images"] == 1 and summary["skipped"]["bad_image_samples"] == lost
    assert summary["bad_images"][0]["file_name"] == file_name
    m = Manifest.load(tmp_path / "skipped")
    assert file_name not in set(m.images_table["file_name"])
    assert len(m.samples) == 12 - lost and m.images.shape[0] == 5 == summary["n_images"]
    # rows were compacted: each image row still matches its file
    for row in m.images_table.itertuples():
        np.testing.assert_array_equal(m.images[row.image_index], _expected_rgb(tiny.images_dir / row.file_name))


def test_image_size_disagreeing_with_instances_is_a_bad_image(tiny, tmp_path):
    tiny.instances["images"][4].update(height=24, width=32)  # cmyk.jpg is 32x24
    tiny.write()
    with pytest.raises(DataError, match=r"cmyk\.jpg: size 32x24 .* differs"):
        _build(tiny, tmp_path / "out")


def test_failed_build_leaves_previous_manifest_untouched(tiny, tmp_path):
    out = tmp_path / "manifest"
    out.mkdir()
    (out / "marker").write_text("previous build")
    (tiny.images_dir / "pal.png").unlink()
    with pytest.raises(DataError, match="pal.png"):
        _build(tiny, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest", "tiny"]  # no temp dir left
    assert sorted(p.name for p in out.iterdir()) == ["marker"]


def test_successful_build_replaces_previous_manifest(tiny, tmp_path):
    out = tmp_path / "manifest"
    out.mkdir()
    (out / "marker").write_text("previous build")
    _build(tiny, out)
    assert not (out / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest", "tiny"]
    Manifest.load(out)


def test_split_selection(tiny, tmp_path):
    _build(tiny, tmp_path / "manifest")
    m = Manifest.load(tmp_path / "manifest")
    val = m.split("val")
    assert set(val["split"]) == {"val"} and list(val.index) == list(val["sample_id"])
    with pytest.raises(DataError, match="no samples in split 'test'"):
        m.split("test")


# ------------------------------------------------------------ load-time validation


@pytest.fixture
def built(tiny, tmp_path):
    _build(tiny, tmp_path / "manifest")
    return tmp_path / "manifest"


def _edit_table(path, edit):
    edit(pd.read_parquet(path)).to_parquet(path, index=False)


def _drop(column):
    return lambda df: df.drop(columns=[column])


def _as_str(column):
    return lambda df: df.assign(**{column: df[column].astype(str)})


def _shift_image_index(df):
    df.loc[0, "image_index"] = 99
    return df


def _wrong_rows(name):
    def edit(root):
        array = np.load(root / name)
        np.save(root / name, array[:-1])
    return edit


def _set_mask_index(row, value):
    def edit(df):
        df.loc[row, "mask_index"] = value
        return df
    return edit


TABLE_EDITS = [
    ("samples.parquet", _drop("mask_rle"), "missing column 'mask_rle'"),
    ("samples.parquet", _drop("mask_index"), "missing column 'mask_index'"),
    ("samples.parquet", _as_str("mask_index"), "column 'mask_index' has dtype"),
    ("samples.parquet", _set_mask_index(0, 99), "column 'mask_index' must number the refs"),  # out of range
    ("samples.parquet", _set_mask_index(0, -1), "column 'mask_index' must number the refs"),
    ("samples.parquet", _set_mask_index(2, 0), "column 'mask_index' must number the refs"),  # another ref's mask
    ("samples.parquet", _as_str("n_targets"), "column 'n_targets' has dtype"),
    ("samples.parquet", _as_str("no_target"), "column 'no_target' has dtype"),
    ("samples.parquet", _shift_image_index, "column 'image_index' has values outside"),
    ("samples.parquet", lambda df: df.assign(kind="both"), "column 'kind' has unknown values"),
    ("images.parquet", lambda df: df.assign(image_id=df["image_id"][::-1].to_numpy()), "'image_id' disagrees"),
    ("images.parquet", _drop("objects_rle"), "missing column 'objects_rle'"),
    ("images.parquet", _as_str("height"), "column 'height' has dtype"),
]


@pytest.mark.parametrize("file_name, edit, message", TABLE_EDITS, ids=[f"{f}-{m}" for f, _, m in TABLE_EDITS])
def test_load_rejects_edited_tables(built, file_name, edit, message):
    _edit_table(built / file_name, edit)
    with pytest.raises(DataError) as err:
        Manifest.load(built)
    assert str(built / file_name) in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("file_name", ["images.npy", "masks.npy", "image_masks.npy"])
def test_load_rejects_arrays_out_of_sync(built, file_name):
    _wrong_rows(file_name)(built)
    # masks.npy's row count comes from samples.parquet's mask_index (one row per ref)
    with pytest.raises(DataError, match=rf"{file_name}: shape .* rows but .*parquet( column 'mask_index' "
                                        rf"\(max \+ 1\))? has \d+ rows"):
        Manifest.load(built)


def test_load_rejects_missing_file(built):
    (built / "masks.npy").unlink()
    with pytest.raises(DataError, match="masks.npy: file not found"):
        Manifest.load(built)


def test_images_are_memory_mapped(built):
    m = Manifest.load(built)
    assert isinstance(m.images, np.memmap) and not m.images.flags.writeable
