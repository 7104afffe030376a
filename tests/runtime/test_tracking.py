"""Tracking: where the MLflow store is, how stage runs are grouped, and metrics files agreeing with MLflow."""

from __future__ import annotations

import inspect
import json

import pytest
from mlflow.tracking import MlflowClient

from jurassiglip.config import params_from_dict
from jurassiglip.runtime.tracking import NullTracker, StageTracker, Tracker, repo_root, tracking_uri


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """An empty project folder as cwd, with the default (sqlite) store."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "JURASSIGLIP_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def protocol_methods(protocol: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(value) for name, value in vars(protocol).items()
            if inspect.isfunction(value) and not name.startswith("_")}


def test_tracker_and_null_tracker_implement_the_stage_tracker_protocol():
    """Both trackers have every StageTracker method with its exact signature, so they cannot drift apart;
    the null one has nothing else and does nothing."""
    methods = protocol_methods(StageTracker)
    assert {"log_metrics", "log_epoch", "restore_epochs", "log_resources", "set_tags", "log_artifact",
            "log_artifacts"} <= set(methods)
    for cls in (Tracker, NullTracker):
        for name, signature in methods.items():
            assert inspect.signature(getattr(cls, name)) == signature, f"{cls.__name__}.{name}"
    assert set(protocol_methods(NullTracker)) == set(methods)
    null = NullTracker()
    assert null.log_epoch("loss", 1, {"val_loss": 1.0}) is None and null.log_artifact("x") is None
    with pytest.raises(AttributeError):
        null.log_param  # noqa: B018  (a method Tracker does not have either)


def test_store_at_repo_root_with_absolute_uri(repo):
    assert tracking_uri() == f"sqlite:///{repo}/mlflow.db"
    nested = repo / "stages"
    nested.mkdir()
    assert repo_root(nested) == repo


def test_store_resolved_through_dvc_experiment_copies(repo, monkeypatch):
    copy = repo / ".dvc" / "tmp" / "exps" / "run" / "abc123"
    copy.mkdir(parents=True)
    (copy / "dvc.yaml").write_text("stages: {}\n")
    assert repo_root(copy) == repo
    monkeypatch.chdir(copy)
    assert tracking_uri() == f"sqlite:///{repo}/mlflow.db"


def test_env_override(repo, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri() == "http://127.0.0.1:5999"


def test_stage_runs_grouped_params_flattened_and_metrics_agree(repo, params_dict):
    params = params_from_dict(params_dict)
    with Tracker.open("build_manifest", params, repo / "data" / "build_manifest") as tracker:
        tracker.log_metrics({"train": {"samples": 10}, "vocab_size": 42})
        first = tracker.run_id
    with Tracker.open("contrastive_pretrain", params, repo / "data" / "contrastive_pretrain") as tracker:
        tracker.log_epoch("loss", 1, {"train_loss": 2.0, "val_loss": 1.5})
        tracker.log_epoch("loss", 2, {"train_loss": 1.0, "val_loss": 1.25})
        second = tracker.run_id
    client = MlflowClient(tracking_uri())
    a, b = client.get_run(first), client.get_run(second)
    assert a.data.tags["mlflow.parentRunId"] == b.data.tags["mlflow.parentRunId"]
    assert a.data.tags["stage"] == "build_manifest"
    assert a.data.params["lora.r"] == str(params.lora.r)
    assert a.data.params["model.tiny.image_size"] == str(params.model.tiny.image_size)
    on_disk = json.loads((repo / "data" / "build_manifest" / "metrics.json").read_text())
    assert on_disk == {"train": {"samples": 10}, "vocab_size": 42}
    assert a.data.metrics == {"train/samples": 10.0, "vocab_size": 42.0}
    history = client.get_metric_history(second, "val_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 1.25)]
    csv = (repo / "data" / "contrastive_pretrain" / "plots" / "loss.csv").read_text().splitlines()
    assert csv == ["epoch,train_loss,val_loss", "1,2.0,1.5", "2,1.0,1.25"]
    assert a.info.status == b.info.status == "FINISHED"

    # The same stage again (e.g. `dvc repro -f`) opens a new pipeline run.
    with Tracker.open("build_manifest", params, repo / "data" / "build_manifest") as tracker:
        third = tracker.run_id
    assert client.get_run(third).data.tags["mlflow.parentRunId"] != a.data.tags["mlflow.parentRunId"]


def test_failing_stage_marked_failed(repo, params_dict):
    params = params_from_dict(params_dict)
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker.open("evaluate", params, repo / "data" / "evaluate") as tracker:
            run_id = tracker.run_id
            raise RuntimeError("boom")
    client = MlflowClient(tracking_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: boom"  # what stopped it, on the run
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


def test_interrupted_stage_marked_killed_without_an_error(repo, params_dict):
    params = params_from_dict(params_dict)
    with pytest.raises(KeyboardInterrupt):
        with Tracker.open("evaluate", params, repo / "data" / "evaluate") as tracker:
            run_id = tracker.run_id
            raise KeyboardInterrupt
    run = MlflowClient(tracking_uri()).get_run(run_id)
    assert run.info.status == "KILLED" and "error" not in run.data.tags


def test_artifacts_land_beside_the_store(repo, params_dict):
    params = params_from_dict(params_dict)
    picture = repo / "x.txt"
    picture.write_text("hello")
    with Tracker.open("render_val", params, repo / "data" / "render_val") as tracker:
        tracker.log_artifact(picture, "gallery")
    stored = list((repo / "mlartifacts").rglob("x.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "hello"


def test_resumed_curve_is_in_the_new_run_and_the_csv_before_any_new_epoch(repo, params_dict):
    # DVC deletes plots/loss.csv before it reruns a stage; a resume that finds every epoch done
    # must still leave the file (and the run's curve) complete.
    params = params_from_dict(params_dict)
    rows = [{"epoch": 1, "train_loss": 2.0, "val_loss": 1.5}, {"epoch": 2, "train_loss": 1.0, "val_loss": 1.25}]
    with Tracker.open("seg_finetune", params, repo / "data" / "seg_finetune") as tracker:
        tracker.restore_epochs("loss", rows)
        run_id = tracker.run_id
    csv = (repo / "data" / "seg_finetune" / "plots" / "loss.csv").read_text().splitlines()
    assert csv == ["epoch,train_loss,val_loss", "1,2.0,1.5", "2,1.0,1.25"]
    history = MlflowClient(tracking_uri()).get_metric_history(run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 1.25)]


def test_stage_stopped_by_invalid_params_is_a_failed_run(repo, params_dict):
    import yaml

    from jurassiglip.config import ConfigError
    from jurassiglip.runtime.tracking import record_failure

    params_dict["lora"]["r"] = -1
    (repo / "params.yaml").write_text(yaml.safe_dump(params_dict))
    run_id = record_failure("contrastive_pretrain", ConfigError("lora.r = -1 must be > 0"), repo / "params.yaml")
    client = MlflowClient(tracking_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["stage"] == "contrastive_pretrain"
    assert run.data.tags["error"] == "ConfigError: lora.r = -1 must be > 0"
    assert run.data.params["lora.r"] == "-1"
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


def test_failure_record_gives_up_quietly_on_an_unreadable_params_file(repo):
    from jurassiglip.runtime.tracking import record_failure

    (repo / "params.yaml").write_text("lora: [unclosed\n")
    assert record_failure("evaluate", ValueError("x"), repo / "params.yaml") is None


def test_sqlite_store_named_by_env_keeps_artifacts_beside_it(repo, params_dict, monkeypatch, tmp_path_factory):
    # not under the stage's cwd, which for `dvc exp run --temp/--queue` is a copy DVC deletes afterwards
    other = tmp_path_factory.mktemp("team_store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}/team.db")
    picture = repo / "x.txt"
    picture.write_text("hello")
    with Tracker.open("render_val", params_from_dict(params_dict), repo / "data" / "render_val") as t:
        t.log_artifact(picture, "gallery")
    assert (other / "team.db").is_file()
    assert [p.read_text() for p in (other / "mlartifacts").rglob("x.txt")] == ["hello"]
    assert not (repo / "mlruns").exists() and not (repo / "mlartifacts").exists()
