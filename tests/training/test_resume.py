"""Resume across the two places a run's checkpoints live: the stage's output folder and its resume copy.

`dvc exp run` deletes or replaces a training stage's `checkpoints/` output
before it runs the stage (and `--temp` / queued experiments run in a copy
that is thrown away), so the loop also keeps each checkpoint under
`.dvc/tmp/resume/<checkpoint folder>/<fingerprint>/` of the real repository
(jurassiglip/training/resume.py). Here the repository is a folder with a
`.dvc` folder and a dvc.yaml, which is all `paths.resume_copy_dir` looks at,
and "DVC deleted the outputs" is an rmtree of the checkpoints folder; the
real `dvc exp run` cases are in tests/stages/test_dvc_resume.py.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from jurassiglip.config import params_from_dict
from jurassiglip.data.datasets import CaptionDataset, EpochSampler
from jurassiglip.data.manifest import Manifest
from jurassiglip.data.tokenizer import load_tokenizer, tokenize
from jurassiglip.model import checkpoint
from jurassiglip.model.build import build_model
from jurassiglip.model.spec import ModelSpec
from jurassiglip.runtime.paths import resume_copy_dir
from jurassiglip.runtime.tracking import NullTracker
from jurassiglip.training import resume
from jurassiglip.training.loop import EpochBatches, LoopSettings, fit
from jurassiglip.training.seg_finetune import SegmentationObjective

EPOCHS = 3
CKPT = Path("data/seg_finetune/checkpoints")


@pytest.fixture(scope="module")
def setup(micro_data, micro_params):
    params = params_from_dict(micro_params)
    manifest = Manifest.load(micro_data / "manifest")
    tokenizer = load_tokenizer(micro_data / "tokenizer")
    ids, mask = tokenize(tokenizer, manifest.samples["sentence"].tolist(), params.model.arch.text_max_len)
    return params, manifest, tokenizer, ids, mask, ModelSpec.from_params(params, tokenizer)


def dvc_repo(folder: Path) -> Path:
    """What `resume_copy_dir` recognises as a DVC repository: a `.dvc` folder and a dvc.yaml."""
    (folder / ".dvc").mkdir(parents=True)
    (folder / "dvc.yaml").write_text("stages: {}\n")
    return folder


class Interrupted(SegmentationObjective):
    """Stopped (Ctrl-C, SIGTERM) at the start of epoch 2, after epoch 1's checkpoints."""

    def train_batches(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return super().train_batches(epoch)


class MustNotTrain(SegmentationObjective):
    def train_batches(self, epoch):
        raise AssertionError(f"trained epoch {epoch} of a run that had finished")


class Curve(NullTracker):
    def __init__(self):
        self.epochs = []

    def log_epoch(self, plot, epoch, values):
        self.epochs.append(epoch)

    def restore_epochs(self, plot, rows):
        self.epochs = [row["epoch"] for row in rows]


def seg_fit(setup, ckpt_dir, *, fingerprint="run-a", objective_class=SegmentationObjective, seed=0,
            tracker=None, epochs=EPOCHS):
    """Stage 2's objective on the micro manifest (live towers), trained by the real loop."""
    params, manifest, tokenizer, ids, mask, spec = setup
    torch.manual_seed(seed)
    model = build_model(spec)
    split = manifest.samples["split"]
    train_ids = manifest.samples.loc[split == "train", "sample_id"].to_numpy()
    val_ids = manifest.samples.loc[split == "val", "sample_id"].to_numpy()
    batches = EpochBatches(CaptionDataset(manifest, ids, mask, with_target=True), EpochSampler(train_ids, None, seed=3),
                           EpochSampler(val_ids, None, seed=3, shuffle=False), batch_size=16, num_workers=0)
    objective = objective_class(model, batches, cfg=params.finetune, spec=spec, tokenizer=tokenizer)
    settings = LoopSettings(epochs=epochs, patience=5, log_every=100, max_val_batches=0, lr=1e-2, weight_decay=0.01,
                            lr_schedule="cosine")
    result = fit(objective, settings, ckpt_dir, run_fingerprint=fingerprint, tracker=tracker or Curve())
    return result, model


def epoch_of(path: Path) -> int:
    return checkpoint.load(path)["state"]["epoch"]


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """The run nobody stopped: its checkpoint files and final weights."""
    repo = dvc_repo(tmp_path_factory.mktemp("uninterrupted"))
    result, model = seg_fit(setup, repo / CKPT)
    return repo, result, model


def test_resume_copy_is_in_the_real_repository_from_the_workspace_and_from_experiment_copies(tmp_path):
    repo = dvc_repo(tmp_path / "repo")
    expected = repo / ".dvc/tmp/resume/data/seg_finetune/checkpoints/f00d"
    assert resume_copy_dir(repo / CKPT, "f00d") == expected
    # `--temp` and queued experiments run in full copies of the repository (dvc.yaml and .dvc/ included)
    for copy in (".dvc/tmp/exps/tmpk2j3x9", ".dvc/tmp/exps/standalone/tmp8a7b6c"):
        dvc_repo(repo / copy)
        assert resume_copy_dir(repo / copy / CKPT, "f00d") == expected
    assert resume_copy_dir(repo / CKPT, "beef") == repo / ".dvc/tmp/resume/data/seg_finetune/checkpoints/beef"


def test_no_resume_copy_outside_a_dvc_repository(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "dvc.yaml").write_text("stages: {}\n")  # a project folder as the reliability tests make, no .dvc/
    assert resume_copy_dir(plain / CKPT, "f00d") is None
    assert resume_copy_dir(tmp_path / "nothing" / CKPT, "f00d") is None  # no dvc.yaml above at all
    assert not (plain / ".dvc").exists()


def test_a_run_whose_outputs_dvc_deleted_resumes_from_the_copy_and_ends_as_the_uninterrupted_run(
        setup, uninterrupted, tmp_path, caplog):
    ref_repo, ref_result, ref_model = uninterrupted
    repo = dvc_repo(tmp_path / "repo")
    with pytest.raises(KeyboardInterrupt):
        seg_fit(setup, repo / CKPT, objective_class=Interrupted)
    copy = resume_copy_dir(repo / CKPT, "run-a")
    assert epoch_of(copy / checkpoint.LATEST) == 1 and (copy / checkpoint.BEST).is_file()
    shutil.rmtree(repo / CKPT)  # what `dvc exp run` does to an output dvc.lock does not record

    tracker = Curve()
    with caplog.at_level(logging.INFO):
        result, model = seg_fit(setup, repo / CKPT, seed=123, tracker=tracker)  # weights come from the copy
    assert f"resuming from {copy / checkpoint.LATEST} after epoch 1" in caplog.text
    assert f"restoring best.safetensors and latest.safetensors from the resume copy {copy}" in caplog.text
    assert result.resumed_from_epoch == 1 and result.epochs_run == EPOCHS
    assert tracker.epochs == [1, 2, 3]  # the curve keeps the interrupted attempt's epoch
    assert (result.best_val_loss, result.best_epoch) == (ref_result.best_val_loss, ref_result.best_epoch)
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    for name in (checkpoint.BEST, checkpoint.LATEST):  # the outputs DVC will record, byte for byte
        assert (repo / CKPT / name).read_bytes() == (ref_repo / CKPT / name).read_bytes(), name
        assert (copy / name).read_bytes() == (repo / CKPT / name).read_bytes(), name


def test_another_runs_checkpoints_in_the_output_folder_are_passed_over_for_the_copy(setup, tmp_path, caplog):
    """`dvc exp run` checks out the baseline's checkpoints (another fingerprint) over the interrupted run's."""
    repo = dvc_repo(tmp_path / "repo")
    with pytest.raises(KeyboardInterrupt):
        seg_fit(setup, repo / CKPT, objective_class=Interrupted)
    shutil.rmtree(repo / CKPT)
    seg_fit(setup, repo / CKPT, fingerprint="baseline", epochs=1)  # the baseline's finished checkpoints
    with caplog.at_level(logging.INFO):
        result, _ = seg_fit(setup, repo / CKPT)
    assert f"{repo / CKPT / checkpoint.LATEST} belongs to another run" in caplog.text
    assert "(other params, code or inputs): not resumed" in caplog.text
    assert result.resumed_from_epoch == 1
    assert checkpoint.load(repo / CKPT / checkpoint.LATEST)["fingerprint"] == "run-a"


def test_a_finished_run_found_in_the_copy_is_not_trained_again(setup, uninterrupted, tmp_path, caplog):
    """A `--temp` experiment re-runs a finished training stage in a fresh copy: it must finish at once, same bytes."""
    ref_repo, ref_result, _ = uninterrupted
    repo = dvc_repo(tmp_path / "repo")
    copy = resume_copy_dir(repo / CKPT, "run-a")
    shutil.copytree(resume_copy_dir(ref_repo / CKPT, "run-a"), copy)
    with caplog.at_level(logging.INFO):
        result, _ = seg_fit(setup, repo / CKPT, objective_class=MustNotTrain)
    assert f"after epoch {EPOCHS}" in caplog.text
    assert (result.resumed_from_epoch, result.epochs_run) == (EPOCHS, EPOCHS)
    assert result.metrics() == ref_result.metrics()
    assert (repo / CKPT / checkpoint.BEST).read_bytes() == (ref_repo / CKPT / checkpoint.BEST).read_bytes()


def test_the_output_folder_is_used_when_it_got_further_than_the_copy(setup, tmp_path, caplog):
    repo = dvc_repo(tmp_path / "repo")
    with pytest.raises(KeyboardInterrupt):
        seg_fit(setup, repo / CKPT, objective_class=Interrupted)
    copy = resume_copy_dir(repo / CKPT, "run-a")
    shutil.rmtree(copy)  # e.g. a copy that could not be written
    with caplog.at_level(logging.INFO):
        result, _ = seg_fit(setup, repo / CKPT)
    assert f"resuming from {repo / CKPT / checkpoint.LATEST} after epoch 1" in caplog.text
    assert result.resumed_from_epoch == 1
    assert epoch_of(copy / checkpoint.LATEST) == EPOCHS  # the copy is whole again


def test_nothing_to_resume_is_logged_naming_where_it_looked(setup, tmp_path, caplog):
    repo = dvc_repo(tmp_path / "repo")
    with caplog.at_level(logging.INFO):
        result, _ = seg_fit(setup, repo / CKPT, epochs=1)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("nothing to resume"))
    assert str(repo / CKPT) in line and str(resume_copy_dir(repo / CKPT, "run-a")) in line
    assert line.endswith("starting over at epoch 1")
    assert result.resumed_from_epoch == 0


def test_outside_dvc_the_log_says_no_copy_is_kept(setup, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        seg_fit(setup, tmp_path / "checkpoints", epochs=1)
    assert "not in a DVC repository: no resume copy is kept" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_a_copy_that_cannot_be_written_is_one_warning_and_training_goes_on(setup, tmp_path, caplog):
    repo = dvc_repo(tmp_path / "repo")
    (repo / ".dvc/tmp").mkdir()
    (repo / ".dvc/tmp/resume").write_text("a file where the folder should be")  # mkdir fails, even for root
    with caplog.at_level(logging.WARNING):
        result, _ = seg_fit(setup, repo / CKPT)
    warnings = [r.getMessage() for r in caplog.records if "cannot keep a resume copy" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert result.epochs_run == EPOCHS and epoch_of(repo / CKPT / checkpoint.LATEST) == EPOCHS


def test_only_the_newest_copies_are_kept(tmp_path):
    parent = tmp_path / "copies"
    old = []
    for age in range(resume.KEEP + 2):  # age 0 is the newest
        folder = parent / f"fingerprint{age}"
        folder.mkdir(parents=True)
        stamp = 1_700_000_000 - 3600 * age
        os.utime(folder, (stamp, stamp))
        old.append(folder)
    current = parent / "current"
    current.mkdir()
    os.utime(current, (1_600_000_000, 1_600_000_000))  # oldest of all, and still never removed
    resume.prune(parent, keep=resume.KEEP, current=current)
    kept = sorted(p.name for p in parent.iterdir())
    assert kept == sorted(["current", *(f"fingerprint{age}" for age in range(resume.KEEP - 1))])
