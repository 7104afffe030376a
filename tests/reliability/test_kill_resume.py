"""A training stage killed with SIGKILL resumes to exactly the result of an uninterrupted run.

The stage runs as a real subprocess. Its log goes into a pipe shrunk to one
page (4 KiB): once the test has seen "epoch 2 step 1" (so epoch 1's
checkpoint is on disk) it stops reading, and the stage blocks on its next
log lines long before it could finish (the rest of the run logs ~10 KiB).
That makes "killed inside a later epoch" a certainty rather than a race
(fixture `killed` in conftest.py, helper `kill_when` in stagerun.py). The
resume fingerprint covers the stage's code (jurassiglip/runtime/codedeps.py), so editing a
module the stage imports while these tests run makes the restart start over and the
resume tests fail.

Corrupt checkpoints: a truncated latest or best checkpoint makes the resume start
over, with a log line naming the file, and still end at the uninterrupted
result; a truncated upstream best checkpoint stops the next stage before any work
with one line naming the file (exit code 2).
"""

from __future__ import annotations

import logging
import signal
import subprocess

import pytest
from mlflow.tracking import MlflowClient
from stagerun import (PYTHON, assert_same_weights, clone_project, kill_when, metrics, project_like, run_in_process,
                      stage_env, stage_refusal, stage_runs)

from jurassiglip.model import checkpoint

CKPT = "data/seg_finetune/checkpoints"


def files(root):
    return {p.relative_to(root): p.stat().st_mtime_ns for p in (root / "data").rglob("*") if p.is_file()}


def epochs_done(latest):
    return checkpoint.load(latest)["state"]["epoch"]


@pytest.mark.slow
def test_sigkill_leaves_a_loadable_checkpoint_of_a_finished_epoch(killed, reliability_params):
    done = epochs_done(killed / CKPT / checkpoint.LATEST)  # loads: never half-written
    assert 1 <= done < reliability_params["finetune"]["epochs"]
    checkpoint.load(killed / CKPT / checkpoint.BEST)
    assert not (killed / "data/seg_finetune/metrics.json").exists()  # the stage did not finish


@pytest.mark.slow
def test_restarted_stage_resumes_and_matches_the_uninterrupted_run(killed, reference_run, tmp_path):
    root = clone_project(killed, tmp_path / "project")
    done = epochs_done(root / CKPT / checkpoint.LATEST)
    (root / CKPT / f".{checkpoint.LATEST}.x1y2.tmp").write_bytes(b"half of a checkpoint")  # what a kill mid-save leaves
    result = subprocess.run([PYTHON, "-m", "stages.seg_finetune"], cwd=root, env=stage_env(root),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"after epoch {done}" in result.stderr and "resuming from" in result.stderr

    ref = reference_run.root
    for name in (checkpoint.BEST, checkpoint.LATEST):
        assert_same_weights(root / CKPT / name, ref / CKPT / name)
    assert metrics(root, "seg_finetune") == metrics(ref, "seg_finetune")
    assert (root / "data/seg_finetune/plots/loss.csv").read_text() == \
        (ref / "data/seg_finetune/plots/loss.csv").read_text()  # the curve keeps the killed attempt's epochs
    assert sorted(p.name for p in (root / CKPT).iterdir()) == [checkpoint.BEST, checkpoint.LATEST]  # no stale temp file
    attempts = stage_runs(root, "seg_finetune")
    assert [r.info.status for r in attempts] == ["RUNNING", "FINISHED"]  # SIGKILL cannot mark its own run
    curve = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_metric_history(attempts[-1].info.run_id, "val_loss")
    assert sorted(m.step for m in curve) == [1, 2, 3]  # the resumed run carries the whole curve


@pytest.mark.slow
def test_sigterm_stops_the_stage_cleanly_and_marks_its_run_killed(reference_run, tmp_path):
    """What torchrun sends the surviving ranks when one fails, and what `kill` and job schedulers send."""
    root = project_like(reference_run.root, tmp_path / "project", "build_manifest", "contrastive_pretrain")
    log = kill_when(root, "seg_finetune", "epoch 2 step 1/", sig=signal.SIGTERM)  # asserts exit code 143
    assert "seg_finetune: stopped by SIGTERM" in log
    assert 1 <= epochs_done(root / CKPT / checkpoint.LATEST)  # the finished epoch's checkpoint stays usable
    assert not (root / "data/seg_finetune/metrics.json").exists()
    attempts = stage_runs(root, "seg_finetune")
    assert [r.info.status for r in attempts] == ["KILLED"]
    parent = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(attempts[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["latest.safetensors", "best.safetensors"])
def test_truncated_checkpoint_starts_over_with_a_message_and_same_result(killed, reference_run, tmp_path, caplog,
                                                                        damaged):
    root = clone_project(killed, tmp_path / "project")
    path = root / CKPT / damaged
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])  # a copy or a disk that stopped half-way
    with pytest.raises(checkpoint.CheckpointError, match=f"{damaged}: not a readable checkpoint"):
        checkpoint.load(path)
    with caplog.at_level(logging.INFO):
        run_in_process(root, "seg_finetune")
    assert f"{damaged}: not a readable checkpoint" in caplog.text and "starting over" in caplog.text
    assert "resuming from" not in caplog.text
    ref = reference_run.root
    assert_same_weights(root / CKPT / checkpoint.BEST, ref / CKPT / checkpoint.BEST)
    assert metrics(root, "seg_finetune") == metrics(ref, "seg_finetune")


@pytest.mark.slow
@pytest.mark.parametrize("stage, upstream", [
    ("seg_finetune", "data/contrastive_pretrain/checkpoints/best.safetensors"),
    ("evaluate", "data/seg_finetune/checkpoints/best.safetensors"),
])
def test_truncated_upstream_checkpoint_stops_the_next_stage_naming_the_file(reference_run, tmp_path, caplog, stage,
                                                                            upstream):
    root = project_like(reference_run.root, tmp_path / "project", "build_manifest", "contrastive_pretrain",
                        "seg_finetune")
    path = root / upstream
    path.write_bytes(path.read_bytes()[:1000])
    before = files(root)
    line = stage_refusal(root, stage, caplog)  # exit 2, one line
    assert f"{upstream}: not a readable checkpoint" in line
    assert files(root) == before  # no work done
    (run,) = stage_runs(root, stage)
    assert run.info.status == "FAILED" and run.data.tags["error"] == f"CheckpointError: {line}"
