"""Paths through the real stages that the default params never take, each run once through its stage.

- evaluate with `evaluate.no_target_rule: area`: the verdicts follow the area, and the run says so;
- contrastive_pretrain with `pretrain.loss: sigmoid`: the sigmoid loss's bias is trained (the clip loss's is not);
- seg_finetune with `finetune.cache_features: false`: no feature cache, the towers run live, the same
  losses as the cached run to fp16 precision;
- early stopping: seg_finetune with patience 1 stops at the first epoch without improvement, and a
  restart of the stopped run does not train again;
- contrastive_pretrain killed inside a later epoch and restarted: resumes and ends bit-identical to an
  uninterrupted run (seg_finetune's resume is in test_kill_resume.py);
- seg_finetune restarted after a kill with other params: the latest checkpoint of the other run is passed
  over, with a line saying so, and the run starts over at epoch 1.

Each test copies what it needs from the reference run (conftest.py) and runs the stage's real main() in
this process, on the micro config.
"""

from __future__ import annotations

import logging
import math

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from stagerun import (assert_same_weights, clone_project, kill_when, metrics, project_like, run_in_process,
                      stage_runs)

from jurassiglip.model import checkpoint

pytestmark = pytest.mark.slow


def set_params(root, **dotted) -> None:
    """Change params.yaml of a project: set_params(root, **{"evaluate.no_target_rule": "area"})."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in dotted.items():
        *path, last = key.split(".")
        node = params
        for part in path:
            node = node[part]
        node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def loss_curve(root, stage) -> pd.DataFrame:
    return pd.read_csv(root / "data" / stage / "plots" / "loss.csv")


def test_area_rule_decides_no_target_by_the_predicted_area(reference_run, tmp_path):
    root = project_like(reference_run.root, tmp_path / "project", "build_manifest", "contrastive_pretrain",
                        "seg_finetune")
    head_table = pd.read_parquet(reference_run.root / "data/evaluate/samples.parquet")
    min_area = float(head_table["area"].median())  # some captions fall below it, some do not
    set_params(root, **{"evaluate.no_target_rule": "area", "evaluate.no_target_min_area": min_area})
    run_in_process(root, "evaluate")

    table = pd.read_parquet(root / "data/evaluate/samples.parquet")
    assert table["area"].tolist() == head_table["area"].tolist()  # same masks: only the verdicts change
    assert table["pred_nt"].tolist() == (table["area"] < min_area).tolist()
    assert table["pred_nt"].any() and not table["pred_nt"].all()
    assert table["pred_nt"].tolist() != head_table["pred_nt"].tolist()
    assert metrics(root, "evaluate")["val"]["N_acc"] == pytest.approx(
        (table["pred_nt"] & table["gt_nt"]).sum() / table["gt_nt"].sum())
    [run] = stage_runs(root, "evaluate")
    assert run.data.tags["no_target_rule"] == (f"pixel foreground when p > 0.4; no-target when the predicted "
                                               f"foreground covers < {min_area:g} of the image")


def test_sigmoid_contrastive_loss_trains_its_bias(reference_run, tmp_path):
    root = project_like(reference_run.root, tmp_path / "project", "build_manifest")
    set_params(root, **{"pretrain.loss": "sigmoid"})
    run_in_process(root, "contrastive_pretrain")

    bias = checkpoint.load(root / "data/contrastive_pretrain/checkpoints/best.safetensors")["model"]["logit_bias"]
    clip = checkpoint.load(reference_run.root / "data/contrastive_pretrain/checkpoints/best.safetensors")["model"]
    assert float(clip["logit_bias"]) == -10.0  # the clip loss has no bias: still SigLIP's initial -10
    assert float(bias) != -10.0
    ours, reference = metrics(root, "contrastive_pretrain"), metrics(reference_run.root, "contrastive_pretrain")
    assert math.isfinite(ours["best_val_loss"]) and ours["start_val_loss"] != reference["start_val_loss"]
    [run] = stage_runs(root, "contrastive_pretrain")
    assert run.data.params["pretrain.loss"] == "sigmoid" and run.info.status == "FINISHED"


def test_live_features_need_no_cache_and_give_the_cached_losses(reference_run, tmp_path):
    runs = {}
    for cache in (True, False):
        root = project_like(reference_run.root, tmp_path / f"cache-{cache}", "build_manifest", "contrastive_pretrain")
        set_params(root, **{"finetune.cache_features": cache, "finetune.batch_size": 16, "finetune.log_every": 50})
        run_in_process(root, "seg_finetune")
        runs[cache] = root
    assert (runs[True] / "data/seg_finetune/features").is_dir()
    assert not (runs[False] / "data/seg_finetune/features").exists()
    live, cached = loss_curve(runs[False], "seg_finetune"), loss_curve(runs[True], "seg_finetune")
    assert live["epoch"].tolist() == cached["epoch"].tolist() == [1, 2, 3]
    # the cache holds the towers' outputs in fp16 (11 bits of mantissa): losses agree to about 3 digits
    for column in ("train_loss", "val_loss"):
        assert live[column].tolist() == pytest.approx(cached[column].tolist(), rel=5e-3), column
        assert live[column].tolist() != cached[column].tolist(), column  # but they are two computations


def test_early_stopping_stops_at_the_first_epoch_without_improvement(reference_run, tmp_path, caplog):
    root = project_like(reference_run.root, tmp_path / "project", "build_manifest", "contrastive_pretrain")
    set_params(root, **{"finetune.epochs": 30, "finetune.patience": 1, "finetune.lr": 0.03,
                        "finetune.lr_schedule": "constant", "finetune.batch_size": 16, "finetune.log_every": 50})
    with caplog.at_level(logging.INFO):
        run_in_process(root, "seg_finetune")

    done = metrics(root, "seg_finetune")
    curve = loss_curve(root, "seg_finetune")
    assert done["epochs_run"] < 30 and len(curve) == done["epochs_run"]
    assert "early stop: no val improvement for 1 epochs" in caplog.text
    assert curve["val_loss"].iloc[-1] >= curve["val_loss"].iloc[:-1].min()  # the last epoch did not improve
    assert all(curve["val_loss"].iloc[:-1].diff().dropna() < 0)  # every epoch before it did
    assert done["best_epoch"] == done["epochs_run"] - 1
    latest = checkpoint.load(root / "data/seg_finetune/checkpoints/latest.safetensors")
    assert latest["state"]["bad_epochs"] == 1 and latest["state"]["epoch"] == done["epochs_run"]

    caplog.clear()
    with caplog.at_level(logging.INFO):  # the stopped run, started again: nothing more to train
        run_in_process(root, "seg_finetune")
    assert f"after epoch {done['epochs_run']}" in caplog.text and "epoch 1/" not in caplog.text
    assert metrics(root, "seg_finetune") == done


def test_killed_contrastive_stage_resumes_and_matches_the_uninterrupted_run(reference_run, tmp_path):
    long = {"pretrain.epochs": 10, "pretrain.batch_size": 4, "pretrain.log_every": 1}
    whole = project_like(reference_run.root, tmp_path / "whole", "build_manifest")
    set_params(whole, **long)
    run_in_process(whole, "contrastive_pretrain")

    root = project_like(reference_run.root, tmp_path / "killed", "build_manifest")
    set_params(root, **long)
    # 10 epochs of 6 logged steps write ~7 KiB after epoch 2 starts: the 4 KiB pipe stops the stage before its end
    kill_when(root, "contrastive_pretrain", "epoch 2 step 1/")
    ckpt = root / "data/contrastive_pretrain/checkpoints"
    done = checkpoint.load(ckpt / checkpoint.LATEST)["state"]["epoch"]
    assert 1 <= done < 10 and not (root / "data/contrastive_pretrain/metrics.json").exists()

    run_in_process(root, "contrastive_pretrain")
    for name in (checkpoint.BEST, checkpoint.LATEST):
        assert_same_weights(ckpt / name, whole / "data/contrastive_pretrain/checkpoints" / name)
    assert metrics(root, "contrastive_pretrain") == metrics(whole, "contrastive_pretrain")
    assert loss_curve(root, "contrastive_pretrain").equals(loss_curve(whole, "contrastive_pretrain"))
    attempts = stage_runs(root, "contrastive_pretrain")
    assert [r.info.status for r in attempts] == ["RUNNING", "FINISHED"]  # SIGKILL cannot mark its own run
    history = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_metric_history(attempts[-1].info.run_id,
                                                                                 "val_loss")
    assert sorted(m.step for m in history) == list(range(1, 11))  # the resumed run carries the whole curve


def test_a_latest_checkpoint_of_other_params_is_passed_over_with_a_line(killed, reference_run, tmp_path, caplog):
    root = clone_project(killed, tmp_path / "project")
    set_params(root, **{"finetune.lr": 0.002})
    latest = root / "data/seg_finetune/checkpoints" / checkpoint.LATEST
    with caplog.at_level(logging.INFO):
        run_in_process(root, "seg_finetune")
    assert f"{latest.relative_to(root)} belongs to another run (other params, code or inputs): not resumed" \
        in caplog.text
    assert "nothing to resume" in caplog.text and "starting over at epoch 1" in caplog.text
    assert "resuming from" not in caplog.text
    done = metrics(root, "seg_finetune")
    assert done["epochs_run"] == 3
    assert done["start_val_loss"] == metrics(reference_run.root, "seg_finetune")["start_val_loss"]  # from scratch
    assert done["best_val_loss"] != metrics(reference_run.root, "seg_finetune")["best_val_loss"]  # other lr
