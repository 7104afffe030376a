"""One Tracker per stage run: the MLflow run and the stage's DVC files together.

Where runs go: `MLFLOW_TRACKING_URI` when set (a team server), else a sqlite
store `mlflow.db` at the repository root with an absolute URI. Before any
work the store is checked (`check_store`): a sqlite file must take a write,
a server must answer one request within JURASSIGLIP_TRACKING_TIMEOUT
seconds (5 by default), so a server that is down is reported in seconds
rather than after MLflow's minutes of retries. DVC runs
queued and temporary experiments in copies under `.dvc/tmp/exps/...`; the
root is resolved through those copies so that every experiment lands in the
one store a user opens with `mlflow ui`.

How runs are grouped: each stage is its own process (DVC starts them one by
one), so the parent run of a pipeline execution is found again through a
tag: stages with the same pipeline key (git commit, DVC experiment name,
params.yaml content) join the newest parent that has no run of their own
stage yet; otherwise they open a new parent. `JURASSIGLIP_PARENT_RUN_ID`
pins the parent explicitly. The parent carries the same params and tags as
its stage runs plus a copy of evaluate's final metrics, so that two
pipelines (baseline and `dvc exp run -S lora.r=16`) compare on their parent
rows. A stage stopped by invalid params still leaves a FAILED run
(`record_failure`).

The same `log_metrics` call writes MLflow and the stage's DVC metrics JSON,
and `log_epoch` writes MLflow steps and the DVC plots CSV, so the two views
never disagree.

Stages and the fit loop see a tracker as a `StageTracker`, the methods they
call; ranks other than 0 under torchrun log into a `NullTracker`.

Why one long module: one Tracker writes both MLflow and DVC's files by the same call, and the store
checks, pipeline-parent logic and failure recording all serve that one run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import yaml

import jurassiglip  # noqa: F401  (sets the telemetry switches before mlflow is imported)
from jurassiglip.runtime import atomic
from jurassiglip.config import PARAMS_FILE, ConfigError, Params, flatten, resolve_choices

log = logging.getLogger(__name__)

STORE_NAME = "mlflow.db"
STORE_LOCK_WAIT = 5.0  # seconds a sqlite write waits for another process's lock (sqlite's default)
SERVER_TIMEOUT = 5.0  # seconds a stage waits for a tracking server's first answer before it gives up
SERVER_TIMEOUT_ENV = "JURASSIGLIP_TRACKING_TIMEOUT"  # overrides SERVER_TIMEOUT (a slow link, a far server)
ARTIFACTS_NAME = "mlartifacts"
EXPS_MARKER = (".dvc", "tmp", "exps")
PARENT_ENV = "JURASSIGLIP_PARENT_RUN_ID"
TAG_PREFIX = "jurassiglip."
SUMMARY_STAGE = "evaluate"  # its final metrics are copied onto the pipeline's parent run


def repo_root(start: str | Path | None = None) -> Path:
    """The real repository root, also from inside `.dvc/tmp/exps/...` copies.

    Args:
        start: where to start; default DVC_ROOT (set by DVC for every stage) or the cwd.
    """
    path = Path(start or os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - len(EXPS_MARKER) + 1):
        if parts[i:i + len(EXPS_MARKER)] == EXPS_MARKER:
            return Path(*parts[:i])
    for candidate in (path, *path.parents):
        if (candidate / "dvc.yaml").exists() or (candidate / ".dvc").is_dir():
            return candidate
    return path


def tracking_uri(start: str | Path | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else an absolute sqlite URI at the repository root."""
    override = os.environ.get("MLFLOW_TRACKING_URI")
    if override:
        return override
    return f"sqlite:///{repo_root(start) / STORE_NAME}"


def git_commit(cwd: str | Path | None = None) -> str:
    """HEAD of the checkout the stage runs in ('unknown' outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def changed_params(current: dict[str, Any], cwd: str | Path | None = None) -> dict[str, Any]:
    """Flattened params that differ from params.yaml at git HEAD (the baseline).

    `dvc exp run -S lora.r=16` edits params.yaml in the experiment's workspace,
    so this is exactly what the experiment changed.
    """
    try:
        out = subprocess.run(["git", "show", f"HEAD:{PARAMS_FILE}"], cwd=cwd, capture_output=True, text=True,
                             check=True)
        baseline = flatten(resolve_choices(yaml.safe_load(out.stdout) or {}))
    except (OSError, subprocess.CalledProcessError, yaml.YAMLError, ConfigError):
        return {}
    flat = flatten(current)
    return {k: v for k, v in flat.items() if baseline.get(k, object()) != v}


class StageTracker(Protocol):
    """What a stage and the fit loop log through: `Tracker` on rank 0, `NullTracker` on the other ranks."""

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        """Final numbers of the stage (DVC metrics JSON and MLflow)."""

    def log_resources(self, values: dict[str, float]) -> None:
        """Wall time, peak memory and the like (MLflow only)."""

    def log_epoch(self, plot: str, epoch: int, values: dict[str, float]) -> None:
        """One row of a per-epoch curve (DVC plots CSV and MLflow steps)."""

    def restore_epochs(self, plot: str, rows: list[dict[str, Any]]) -> None:
        """The rows of a curve written before a resume."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """One file into the MLflow run's artifacts."""

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """A folder's files into the MLflow run's artifacts."""

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Tags of the MLflow run."""


class TrackingError(RuntimeError):
    """The MLflow store cannot take this stage's run; raised before the stage does any work."""


class Tracker:
    """Logging surface of one stage run. Made by `Tracker.open`, never directly."""

    def __init__(self, client: Any, run_id: str, stage_dir: Path):
        self._client = client
        self.run_id = run_id
        self.stage_dir = stage_dir
        self.metrics_file = stage_dir / "metrics.json"
        self._metrics: dict[str, Any] = {}
        self._plots: dict[str, list[dict[str, Any]]] = {}
        self._summary_run: str | None = None  # the parent run, for SUMMARY_STAGE

    @classmethod
    @contextmanager
    def open(cls, stage: str, params: Params, stage_dir: Path) -> Iterator[Tracker]:
        """Start the stage's MLflow run under its pipeline parent; FAILED if the body raises, KILLED if interrupted."""
        uri = tracking_uri()
        try:
            check_store(uri)
            client, run_id, parent_id = _start_run(uri, stage, params)
        except TrackingError:
            raise
        except Exception as err:  # MlflowException, sqlalchemy and requests errors alike
            raise TrackingError(f"MLflow store {uri}: cannot start the {stage} run ({_first_line(err)}); "
                                f"{_store_hint(uri)}") from err
        stage_dir.mkdir(parents=True, exist_ok=True)
        tracker = cls(client, run_id, stage_dir)
        if stage == SUMMARY_STAGE:
            # The runs table shows parent rows first: with params and these metrics on them, two
            # pipelines compare in two clicks (tick both, Compare).
            tracker._summary_run = parent_id
        log.info("%s: MLflow run %s (parent %s) in %s", stage, run_id[:8], parent_id[:8], uri)
        try:
            yield tracker
        except BaseException as err:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"  # Ctrl-C or SIGTERM: KILLED
            if status == "FAILED":  # what stopped it, on the run, as for invalid params (record_failure)
                client.set_tag(run_id, "error", _first_line(err)[:5000])
            client.set_terminated(run_id, status)
            client.set_terminated(parent_id, status)
            raise
        client.set_terminated(run_id, "FINISHED")
        client.set_terminated(parent_id, "FINISHED")

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        """Final numbers: nested dict -> MLflow (`val/cIoU`) and the DVC metrics JSON (`val.cIoU`)."""
        _merge(self._metrics, metrics)
        self._log_batch(flatten(metrics, sep="/"), step=None)
        if self._summary_run:
            self._log_batch(flatten(metrics, sep="/"), step=None, run_id=self._summary_run)
        atomic.write_json(self.metrics_file, self._metrics)

    def log_resources(self, values: dict[str, float]) -> None:
        """Wall time, peak memory and the like: MLflow only, since they differ between identical runs
        and would make the DVC metrics file (and `dvc status`) change for no reason."""
        self._log_batch(values, step=None)

    def log_epoch(self, plot: str, epoch: int, values: dict[str, float]) -> None:
        """One row of a per-epoch curve: MLflow metrics at step=epoch and `<stage_dir>/plots/<plot>.csv`."""
        row = {"epoch": epoch, **values}
        self._plots.setdefault(plot, []).append(row)
        self._log_batch(values, step=epoch)
        self._write_plot(plot)

    def restore_epochs(self, plot: str, rows: list[dict[str, Any]]) -> None:
        """Re-seed a curve after a resume: the epochs of the first attempt go into this run's MLflow
        curve and the CSV, which is written now. DVC deletes the CSV before it runs the stage, and a
        resume may find every epoch done already (e.g. seg_finetune rerun in a `dvc exp run --temp`
        copy only because the uncached feature cache is missing there)."""
        self._plots[plot] = list(rows)
        for row in rows:
            self._log_batch({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        if rows:
            self._write_plot(plot)

    def _write_plot(self, plot: str) -> None:
        rows = self._plots[plot]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic.write_text(self.stage_dir / "plots" / f"{plot}.csv", buffer.getvalue())

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifacts(self.run_id, str(folder), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def _log_batch(self, values: dict[str, Any], step: int | None, run_id: str | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step or 0) for k, v in values.items() if _is_number(v)]
        for i in range(0, len(metrics), 500):
            self._client.log_batch(run_id or self.run_id, metrics=metrics[i:i + 500])


class NullTracker:
    """Stands in for the Tracker on ranks other than 0 under torchrun: every StageTracker method, doing nothing.

    One training stage is one MLflow run and one set of DVC files, written by
    rank 0; the other ranks run the same stage code and log into this.
    """

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        pass

    def log_resources(self, values: dict[str, float]) -> None:
        pass

    def log_epoch(self, plot: str, epoch: int, values: dict[str, float]) -> None:
        pass

    def restore_epochs(self, plot: str, rows: list[dict[str, Any]]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass


def check_store(uri: str) -> None:
    """Fail fast, naming the file or server, when the store cannot take the run.

    MLflow itself would retry opening an unusable sqlite file for about 100 s
    and then report a bare sqlalchemy error. A write transaction that is rolled
    back tells a read-only file or folder apart from a store that another
    process keeps locked; a lock is waited for up to STORE_LOCK_WAIT seconds
    (sqlite's busy timeout) before giving up. A tracking server (http, https)
    gets one request (`check_server`). Other stores are checked by their
    first request.

    Raises:
        TrackingError: the store cannot be created, written, or locked for writing; the server does not answer.
    """
    if uri.startswith(("http://", "https://")):
        check_server(uri)
        return
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=STORE_LOCK_WAIT, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("CREATE TABLE jurassiglip_write_probe (x INTEGER)")
            connection.execute("ROLLBACK")
        finally:
            connection.close()
    except (OSError, sqlite3.Error) as err:
        if "locked" in str(err):
            why = (f"is locked by another process for more than {STORE_LOCK_WAIT:g} s (another stage, a dvc queue "
                   "worker, `mlflow ui`?); run queued experiments with `dvc queue start -j 1`")
        else:
            why = f"cannot be written ({err}): make the file and its folder writable, or set MLFLOW_TRACKING_URI"
        raise TrackingError(f"MLflow store {path} {why}") from None


def check_server(uri: str) -> None:
    """One request to a tracking server, without retries: no answer within the timeout stops the stage.

    MLflow retries a request that fails to connect (MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    7 by default, with backoff: about four minutes) and waits up to
    MLFLOW_HTTP_REQUEST_TIMEOUT (120 s) for each answer, so a server that is
    down would only be reported minutes later, and again when a params error
    is recorded. Any HTTP answer, even an error status or a TLS handshake
    that MLflow's own settings may accept, counts as reachable.

    Raises:
        TrackingError: refused, unresolvable or silent for SERVER_TIMEOUT_ENV seconds (default SERVER_TIMEOUT).
    """
    import requests

    timeout = server_timeout()
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout, allow_redirects=False)
    except requests.exceptions.SSLError:
        return  # it answered; whether its certificate is accepted is MLflow's settings' business
    except requests.exceptions.Timeout:
        raise TrackingError(f"MLflow store {uri}: the tracking server did not answer within {timeout:g} s; "
                            f"{_store_hint(uri)}") from None
    except requests.exceptions.RequestException as err:
        raise TrackingError(f"MLflow store {uri}: cannot reach the tracking server ({_os_reason(err)}); "
                            f"{_store_hint(uri)}") from None


def server_timeout() -> float:
    """Seconds `check_server` waits: SERVER_TIMEOUT_ENV if set, else SERVER_TIMEOUT."""
    raw = os.environ.get(SERVER_TIMEOUT_ENV, "")
    if not raw:
        return SERVER_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise TrackingError(f"{SERVER_TIMEOUT_ENV} = {raw!r} must be a number of seconds > 0")
    return value


def _os_reason(err: BaseException) -> str:
    """The operating system's words inside a requests error ("[Errno 111] Connection refused"), else its type."""
    found = re.search(r"\[Errno -?\d+\] [^'\")]+", str(err))
    return found.group(0) if found else type(err).__name__


def record_failure(stage: str, error: BaseException, params_file: str | Path = PARAMS_FILE) -> str | None:
    """A FAILED run for a stage that stopped before its run opened (invalid params, typically).

    A `dvc exp run -S` value that params validation rejects would otherwise leave
    no trace in MLflow, which is where a user looks for the outcome of queued
    experiments. The run (and its pipeline parent) carries the usual tags, the
    raw params.yaml flattened, and the message as the tag `error`. Best effort:
    when the file cannot be parsed or the store cannot be written, a warning is
    logged and the caller goes on to report the original error.

    Returns:
        The id of the FAILED run, or None when nothing was recorded.
    """
    try:
        tree = yaml.safe_load(Path(params_file).read_text())
        try:
            tree = resolve_choices(tree)
        except ConfigError:
            pass  # an invalid choice is the error being reported: log the tree as it is
        experiment = tree["tracking"]["experiment"]
        uri = tracking_uri()
        check_store(uri)
        client, run_id, parent_id = _create_stage_run(uri, stage, str(experiment), tree)
        client.set_tag(run_id, "error", _first_line(error)[:5000])
        client.set_terminated(run_id, "FAILED")
        client.set_terminated(parent_id, "FAILED")
    except Exception as err:  # a problem here must not hide the error being reported
        log.warning("%s: could not record the failure in MLflow (%s)", stage, _first_line(err))
        return None
    log.info("%s: recorded as FAILED MLflow run %s", stage, run_id[:8])
    return run_id


# -- internals ---------------------------------------------------------------

def _start_run(uri: str, stage: str, params: Params) -> tuple[Any, str, str]:
    """Create the stage's run under its pipeline parent, with tags and params; (client, run_id, parent_id)."""
    return _create_stage_run(uri, stage, params.tracking.experiment, params.to_dict())


def _create_stage_run(uri: str, stage: str, experiment: str, tree: dict[str, Any]) -> tuple[Any, str, str]:
    """`_start_run` on a params tree (also an unvalidated one, for `record_failure`)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    artifacts = _artifact_root(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, experiment, artifacts)
    commit = git_commit()
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    changed = changed_params(tree)
    shared = {  # on the stage run and on its pipeline parent, so both can be filtered and compared
        "git_commit": commit,
        "dvc_exp_name": exp_name,
        "params_changed": ", ".join(f"{k}={v}" for k, v in sorted(changed.items())) or "baseline",
    }
    parent_id = _parent_run(client, experiment_id, stage, _pipeline_key(commit, exp_name, tree), exp_name,
                            shared, flatten(tree))
    tags = {
        "mlflow.parentRunId": parent_id,
        "mlflow.runName": f"{stage}" + (f" [{exp_name}]" if exp_name else ""),
        "stage": stage,
        **shared,
    }
    run = client.create_run(experiment_id, tags=tags)
    _log_params(client, run.info.run_id, flatten(tree))
    return client, run.info.run_id, parent_id


def _artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite store (the default one at the
    repository root, or one MLFLOW_TRACKING_URI names), never MLflow's fallback `./mlruns` under
    the stage's cwd, which for `dvc exp run --temp/--queue` is a copy that DVC deletes; a server
    (http...) decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    store = Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).resolve()
    return (store.parent / ARTIFACTS_NAME).as_uri()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _store_hint(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return (f"is the tracking server running and reachable? MLFLOW_TRACKING_URI picks the server, "
                f"{SERVER_TIMEOUT_ENV} the seconds to wait for it (default {SERVER_TIMEOUT:g})")
    return "check MLFLOW_TRACKING_URI, or unset it for the sqlite store at the repository root"


def _experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _pipeline_key(commit: str, exp_name: str, tree: dict[str, Any]) -> str:
    blob = json.dumps([commit, exp_name, tree], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _parent_run(client: Any, experiment_id: str, stage: str, key: str, exp_name: str,
                tags: dict[str, str], flat_params: dict[str, Any]) -> str:
    """The pipeline run this stage joins; a new one carries `tags` and the flattened params
    (the runs list then shows lora.r etc. on the pipeline rows as well)."""
    pinned = os.environ.get(PARENT_ENV)
    if pinned:
        return pinned
    parents = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PREFIX}pipeline_key` = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if parents:
        parent = parents[0]
        siblings = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.stage = '{stage}'",
            max_results=1,
        )
        if not siblings:
            client.update_run(parent.info.run_id, status="RUNNING")
            return parent.info.run_id
    name = f"pipeline [{exp_name}]" if exp_name else "pipeline"
    run = client.create_run(experiment_id, tags={
        f"{TAG_PREFIX}pipeline_key": key,
        "mlflow.runName": name,
        **tags,
    })
    _log_params(client, run.info.run_id, flat_params)
    return run.info.run_id


def _log_params(client: Any, run_id: str, flat: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in sorted(flat.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
