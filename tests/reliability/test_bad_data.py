"""A manifest damaged after build_manifest stops the next stage at load time, naming the file and column.

Each case edits a copy of the reference run's manifest by hand, as a user
might (a column dropped, a dtype changed, an array from another build), then
runs the real training stage entry. The stage must fail in Manifest.load,
before any checkpoint or feature cache exists, in one line naming the file
(exit code 2), and its MLflow run must say FAILED with that line as its
`error` tag.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from stagerun import project_like, stage_refusal, stage_runs

MANIFEST = "data/build_manifest/manifest"


def drop_column(column):
    def edit(root):
        path = root / MANIFEST / "samples.parquet"
        pd.read_parquet(path).drop(columns=[column]).to_parquet(path, index=False)
    return edit


def retype_column(column, dtype):
    def edit(root):
        path = root / MANIFEST / "samples.parquet"
        table = pd.read_parquet(path)
        table[column] = table[column].astype(dtype)
        table.to_parquet(path, index=False)
    return edit


def null_sentence(root):
    path = root / MANIFEST / "samples.parquet"
    table = pd.read_parquet(path)
    table.loc[3, "sentence"] = None
    table.to_parquet(path, index=False)


def drop_last_rows(name, n=2):
    def edit(root):
        array = np.load(root / MANIFEST / name)
        np.save(root / MANIFEST / name, array[:-n])
    return edit


def masks_of_another_size(root):
    array = np.load(root / MANIFEST / "masks.npy")
    np.save(root / MANIFEST / "masks.npy", np.zeros((len(array), array.shape[1] // 4), dtype=np.uint8))


def params_for_another_image_size(root):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"]["tiny"]["image_size"] = 64  # params changed, manifest not rebuilt
    (root / "params.yaml").write_text(yaml.safe_dump(params))


CASES = [
    ("contrastive_pretrain", drop_column("sentence"), "samples.parquet: missing column 'sentence'"),
    ("seg_finetune", drop_column("image_index"), "samples.parquet: missing column 'image_index'"),
    ("contrastive_pretrain", retype_column("image_index", "float64"),
     "samples.parquet: column 'image_index' has dtype float64, expected int"),
    ("seg_finetune", retype_column("no_target", "str"), "samples.parquet: column 'no_target' has dtype"),
    ("contrastive_pretrain", null_sentence, "samples.parquet: column 'sentence' must hold only strings"),
    ("contrastive_pretrain", drop_last_rows("images.npy"), "images.npy: shape"),
    ("seg_finetune", drop_last_rows("masks.npy"), "masks.npy: shape"),
    ("seg_finetune", masks_of_another_size, "masks.npy: shape"),
    ("contrastive_pretrain", params_for_another_image_size,
     "images.npy: images are 32x32 but model.tiny.image_size is 64"),
]


@pytest.mark.slow
@pytest.mark.parametrize("stage, damage, message", CASES, ids=[f"{s}-{m[:40]}" for s, _, m in CASES])
def test_damaged_manifest_stops_the_stage_at_load_time(reference_run, tmp_path, caplog, stage, damage, message):
    upstream = ["build_manifest"] + (["contrastive_pretrain"] if stage == "seg_finetune" else [])
    root = project_like(reference_run.root, tmp_path / "project", *upstream)
    damage(root)
    line = stage_refusal(root, stage, caplog)  # exit 2, one line
    assert message in line
    assert str(root / MANIFEST) in line or MANIFEST in line  # names the file
    assert not (root / "data" / stage / "checkpoints").exists()
    assert not (root / "data" / stage / "features").exists()
    (run,) = stage_runs(root, stage)
    assert run.info.status == "FAILED" and run.data.tags["error"] == f"DataError: {line}"
