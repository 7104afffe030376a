"""An MLflow store that cannot take the run stops the stage at its start, with a clear error, before any work.

Cases: a tracking server that is not there or does not answer
(MLFLOW_TRACKING_URI, as a team sets it; one request, JURASSIGLIP_TRACKING_TIMEOUT
seconds, instead of MLflow's minutes of retries), a read-only sqlite file, a read-only folder for a new store, and a
store another process keeps locked. The stage is build_manifest through its
real entry, so "before any work" means: no synthetic data generated, no
manifest written. Plus the opposite direction: every number of every stage
of the reference run is in MLflow as well as in its DVC metrics file.

Read-only is made with chmod when the tests run as a normal user and with the
immutable attribute (chattr +i) as root, whom permission bits do not stop.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sqlite3
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from stagerun import make_project, metrics, run_in_process

from jurassiglip.config import flatten
from jurassiglip.runtime.paths import STAGES
from jurassiglip.runtime.tracking import SERVER_TIMEOUT_ENV, STORE_LOCK_WAIT, TrackingError, check_store


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def read_only(path: Path):
    """Make `path` (file or folder) unwritable for this process, whoever runs the tests."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: cannot make a file read-only for root")
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"running as root and chattr +i is not permitted here: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.fixture
def project(tmp_path, micro_params):
    return make_project(tmp_path / "project", micro_params)


def assert_no_work(root: Path) -> None:
    assert not (root / "data").exists(), sorted(str(p) for p in (root / "data").rglob("*"))


def start_stage(root: Path, **env: str) -> None:
    """Run build_manifest; it must stop with exit code 2 (the error is in the log)."""
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(root, "build_manifest", **env)
    assert exit_info.value.code == 2


def test_unreachable_tracking_server(project, caplog, monkeypatch):
    """A server that is down, with MLflow's own retry settings at their defaults (7 retries, minutes)."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", SERVER_TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    uri = f"http://127.0.0.1:{closed_port()}"
    with caplog.at_level(logging.ERROR):
        start_stage(project, MLFLOW_TRACKING_URI=uri)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith(f"MLflow store {uri}: cannot reach the tracking server ([Errno 111] Connection refused)")
    assert "MLFLOW_TRACKING_URI" in line and SERVER_TIMEOUT_ENV in line
    assert_no_work(project)


def test_silent_tracking_server_is_given_up_after_the_timeout(project, caplog):
    """A server that accepts the connection but never answers (hung, or a wrong port) is waited for
    JURASSIGLIP_TRACKING_TIMEOUT seconds, not MLflow's 120 s per request times its retries."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshakes; nobody reads the request
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with caplog.at_level(logging.ERROR):
            start_stage(project, MLFLOW_TRACKING_URI=uri, **{SERVER_TIMEOUT_ENV: "1"})
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith(f"MLflow store {uri}: the tracking server did not answer within 1 s; ")
    assert_no_work(project)


def test_bad_params_with_an_unreachable_server_say_both_at_once(project, caplog):
    """The params error is reported, and recording it as a FAILED run gives up after one refused
    request, not after MLflow's retries."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["lora"]["r"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    uri = f"http://127.0.0.1:{closed_port()}"
    with caplog.at_level(logging.WARNING):
        start_stage(project, MLFLOW_TRACKING_URI=uri)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 2, messages
    assert "lora.r = 0 must be > 0" in messages[0]
    assert messages[1].startswith(f"build_manifest: could not record the failure in MLflow (TrackingError: MLflow "
                                  f"store {uri}: cannot reach the tracking server ([Errno 111] Connection refused)")
    assert_no_work(project)


@pytest.mark.parametrize("value", ["soon", "0", "-3", "nan"])
def test_a_bad_tracking_timeout_is_named(project, caplog, value):
    with caplog.at_level(logging.ERROR):
        start_stage(project, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{closed_port()}", **{SERVER_TIMEOUT_ENV: value})
    assert f"{SERVER_TIMEOUT_ENV} = {value!r} must be a number of seconds > 0" in caplog.text
    assert_no_work(project)


def test_read_only_store_file(project, caplog):
    check_store(f"sqlite:///{project / 'mlflow.db'}")  # an existing, valid store ...
    with read_only(project / "mlflow.db"), caplog.at_level(logging.ERROR):  # ... that cannot be written
        start_stage(project)
    assert f"MLflow store {project / 'mlflow.db'} cannot be written" in caplog.text
    assert "readonly database" in caplog.text
    assert_no_work(project)


def test_store_in_a_read_only_folder(project, tmp_path, caplog):
    folder = tmp_path / "shared"
    folder.mkdir()
    with read_only(folder), caplog.at_level(logging.ERROR):
        start_stage(project, MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'team.db'}")
    assert f"MLflow store {folder / 'team.db'} cannot be written" in caplog.text
    assert_no_work(project)
    assert not (folder / "team.db").exists()


@pytest.mark.slow
def test_store_locked_by_another_process(project, caplog):
    store = project / "mlflow.db"
    check_store(f"sqlite:///{store}")
    holder = sqlite3.connect(store, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # e.g. another stage in the middle of a long write
    try:
        with caplog.at_level(logging.ERROR):
            start_stage(project)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert f"MLflow store {store} is locked by another process for more than {STORE_LOCK_WAIT:g} s" in caplog.text
    assert "dvc queue start -j 1" in caplog.text
    assert_no_work(project)


def test_check_store_errors_name_the_file(tmp_path):
    with read_only(tmp_path):
        with pytest.raises(TrackingError, match=f"{tmp_path / 'x' / 'mlflow.db'} cannot be written"):
            check_store(f"sqlite:///{tmp_path / 'x' / 'mlflow.db'}")  # its folder cannot even be made
    with pytest.raises(TrackingError, match=r"http://127.0.0.1:1: cannot reach the tracking server \(\[Errno 111\]"):
        check_store("http://127.0.0.1:1")  # a server: one request


@pytest.mark.slow
def test_every_metric_of_every_stage_reached_mlflow(reference_run):
    """The DVC metrics files and MLflow agree: nothing a stage reported is missing from its MLflow run."""
    client = MlflowClient(f"sqlite:///{reference_run.root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jurassiglip")
    for stage in STAGES:
        (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.stage = '{stage}'")
        assert run.info.status == "FINISHED"
        numbers = {k: float(v) for k, v in flatten(metrics(reference_run.root, stage), sep="/").items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert numbers, stage
        logged = {k: v for k, v in run.data.metrics.items() if k in numbers}
        assert logged == numbers, stage
