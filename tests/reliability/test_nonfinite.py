"""Non-finite values stop a training stage loudly, name where they came from, and spare the checkpoints.

The NaN enters through the real stage, never through a stand-in for fit:
- a poisoned row of the frozen-feature cache (what bit rot or a stale cache
  would give) reaches a training batch of a resumed seg_finetune;
- the same poison in a validation caption reaches the validation loss, which
  fit used to accept silently (NaN < best is False: no best checkpoint, a "finished"
  stage with best_val_loss inf);
- pretrained weights whose outputs overflow fp16 (65504) would have been
  cached as inf: the cache build refuses them, naming the images.
Each stops the stage with exit code 2 and that one line, no traceback.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from stagerun import clone_project, project_like, stage_refusal, stage_runs

from jurassiglip.model import checkpoint

CKPT = "data/seg_finetune/checkpoints"
FEATURES = "data/seg_finetune/features"


def poison_caption(root, split):
    """NaN into the cached text tokens of the first caption of `split`; return its sample id."""
    samples = pd.read_parquet(root / "data/build_manifest/manifest/samples.parquet")
    sample_id = int(samples.loc[samples["split"] == split, "sample_id"].iloc[0])
    row = int(np.load(root / FEATURES / "index.npz")["sample_row"][sample_id])
    text = np.load(root / FEATURES / "text.npy", mmap_mode="r+")
    text[row] = np.nan
    text.flush()
    del text
    return sample_id


def named_ids(message):
    return [int(i) for i in re.search(r"sample ids \[([\d, ]+)\]", message).group(1).split(",")]


@pytest.mark.slow
def test_nan_in_a_training_batch_stops_the_stage_naming_step_and_samples(killed, tmp_path, caplog):
    root = clone_project(killed, tmp_path / "project")
    poisoned = poison_caption(root, "train")
    before = {name: (root / CKPT / name).read_bytes() for name in (checkpoint.LATEST, checkpoint.BEST)}
    done = checkpoint.load(root / CKPT / checkpoint.LATEST)["state"]["epoch"]

    # resumes after `done` epochs, then meets the poisoned caption: exit 2, one line
    message = stage_refusal(root, "seg_finetune", caplog)

    assert re.search(rf"non-finite loss nan at epoch {done + 1} step \d+; batch sample ids \[", message), message
    assert poisoned in named_ids(message)
    for name, blob in before.items():
        assert (root / CKPT / name).read_bytes() == blob, f"{name} changed"  # the last good checkpoints stay
    assert not (root / "data/seg_finetune/metrics.json").exists()
    run = stage_runs(root, "seg_finetune")[-1]
    assert run.info.status == "FAILED" and run.data.tags["error"] == f"NonFiniteLoss: {message}"


@pytest.mark.slow
def test_nan_in_a_validation_batch_stops_before_the_first_epoch(reference_run, tmp_path, caplog):
    root = project_like(reference_run.root, tmp_path / "project", "build_manifest", "contrastive_pretrain")
    shutil.copytree(reference_run.root / FEATURES, root / FEATURES)  # a valid cache...
    poisoned = poison_caption(root, "val")  # ...with one bad validation caption
    message = stage_refusal(root, "seg_finetune", caplog)  # exit 2, one line
    assert re.search(r"non-finite validation loss nan.*batch sample ids \[", message), message
    assert poisoned in named_ids(message)
    assert not (root / CKPT).exists()
    assert stage_runs(root, "seg_finetune")[-1].info.status == "FAILED"


@pytest.mark.slow
def test_features_beyond_fp16_are_refused_when_caching_naming_the_images(reference_run, tmp_path, caplog):
    root = project_like(reference_run.root, tmp_path / "project", "build_manifest", "contrastive_pretrain")
    path = root / "data/contrastive_pretrain/checkpoints" / checkpoint.BEST
    with safe_open(path, framework="pt") as stored:
        metadata = stored.metadata()
        tensors = {key: stored.get_tensor(key) for key in stored.keys()}
    (norm,) = [k for k in tensors if k.startswith("model.vision.") and k.endswith("model.norm.weight")]
    tensors[norm] = tensors[norm] * 1e6  # patch tokens now reach ~1e6
    save_file(tensors, path, metadata=metadata)
    message = stage_refusal(root, "seg_finetune", caplog)  # exit 2, one line
    assert re.search(r"patch tokens of image_index \[\d+.*fp16 range.*cache_features", message), message
    assert not (root / CKPT).exists() and not (root / FEATURES).exists()
    assert stage_runs(root, "seg_finetune")[-1].info.status == "FAILED"
