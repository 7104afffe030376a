"""Same params and seed, same numbers: the micro pipeline run twice gives identical metrics files (CPU).

The reference run (subprocesses) and a second run of the same params (the
stages' main() in this process) must agree to the last digit in every DVC
metrics and plots file; a different `seed` must change the training curves
and the evaluation. On GPU the guarantee is weaker (see the README's
reliability section): this is the CPU contract.
"""

from __future__ import annotations

import copy

import pytest
import yaml
from stagerun import make_project, metrics, project_like, run_in_process

from jurassiglip.runtime.paths import STAGES

TRAINING = ("contrastive_pretrain", "seg_finetune")


def curves(root, stage):
    return (root / "data" / stage / "plots" / "loss.csv").read_text()


@pytest.mark.slow
def test_same_seed_gives_identical_metrics_files(reference_run, reliability_params, tmp_path):
    root = make_project(tmp_path / "project", reliability_params)
    run_in_process(root, *STAGES)
    for stage in STAGES:
        assert metrics(root, stage) == metrics(reference_run.root, stage), stage
    for stage in TRAINING:
        assert curves(root, stage) == curves(reference_run.root, stage), stage
    assert (root / "data/evaluate/samples.csv").read_text() == \
        (reference_run.root / "data/evaluate/samples.csv").read_text()  # every per-sample I and U


@pytest.mark.slow
def test_another_seed_gives_other_metrics(reference_run, tmp_path):
    # `seed` drives initialisation and shuffles, not the data: the manifest is reused.
    root = project_like(reference_run.root, tmp_path / "project", "build_manifest")
    params = yaml.safe_load((root / "params.yaml").read_text())
    reseeded = copy.deepcopy(params)
    reseeded["seed"] = params["seed"] + 1
    (root / "params.yaml").write_text(yaml.safe_dump(reseeded))
    run_in_process(root, "contrastive_pretrain", "seg_finetune", "evaluate")
    for stage in TRAINING:
        assert metrics(root, stage)["best_val_loss"] != metrics(reference_run.root, stage)["best_val_loss"], stage
        assert curves(root, stage) != curves(reference_run.root, stage), stage
    ours, theirs = metrics(root, "evaluate"), metrics(reference_run.root, "evaluate")
    assert ours["val"]["cIoU"] != theirs["val"]["cIoU"] or ours["val"]["gIoU"] != theirs["val"]["gIoU"]
