"""One Tracker per stage run: the MLflow run and the stage's DVC files together.

Where runs go: `MLFLOW_TRACKING_URI` when set (a team server), else a sqlite
store `mlflow.db` at the repository root with an absolute URI. DVC runs
queued and temporary experiments in copies under `.dvc/tmp/exps/...`; the
root is resolved through those copies so that every experiment lands in the
one store a user opens with `mlflow ui`.

How runs are grouped: each stage is its own process (DVC starts them one by
one), so the parent run of a pipeline execution is found again through a
tag: stages with the same pipeline key (git commit, DVC experiment name,
params.yaml content) join the newest parent that has no run of their own
stage yet; otherwise they open a new parent. `JURASSIGLIP_PARENT_RUN_ID`
pins the parent explicitly.

The same `log_metrics` call writes MLflow and the stage's DVC metrics JSON,
and `log_epoch` writes MLflow steps and the DVC plots CSV, so the two views
never disagree.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

import jurassiglip  # noqa: F401  (sets the telemetry switches before mlflow is imported)
from jurassiglip import atomic
from jurassiglip.config import PARAMS_FILE, Params, flatten

log = logging.getLogger(__name__)

STORE_NAME = "mlflow.db"
ARTIFACTS_NAME = "mlartifacts"
EXPS_MARKER = (".dvc", "tmp", "exps")
PARENT_ENV = "JURASSIGLIP_PARENT_RUN_ID"
TAG_PREFIX = "jurassiglip."


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
        baseline = flatten(yaml.safe_load(out.stdout) or {})
    except (OSError, subprocess.CalledProcessError, yaml.YAMLError):
        return {}
    flat = flatten(current)
    return {k: v for k, v in flat.items() if baseline.get(k, object()) != v}


class Tracker:
    """Logging surface of one stage run. Made by `Tracker.open`, never directly."""

    def __init__(self, client: Any, run_id: str, stage_dir: Path):
        self._client = client
        self.run_id = run_id
        self.stage_dir = stage_dir
        self.metrics_file = stage_dir / "metrics.json"
        self._metrics: dict[str, Any] = {}
        self._plots: dict[str, list[dict[str, Any]]] = {}

    @classmethod
    @contextmanager
    def open(cls, stage: str, params: Params, stage_dir: Path) -> Iterator[Tracker]:
        """Start the stage's MLflow run under its pipeline parent; FAILED if the body raises."""
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = tracking_uri()
        # With the default store, artifacts sit beside it at the root (not in a DVC temp copy).
        artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (repo_root() / ARTIFACTS_NAME).as_uri()
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        experiment_id = _experiment_id(client, params.tracking.experiment, artifacts)
        tree = params.to_dict()
        commit = git_commit()
        exp_name = os.environ.get("DVC_EXP_NAME", "")
        changed = changed_params(tree)
        parent_id = _parent_run(client, experiment_id, stage, _pipeline_key(commit, exp_name, tree), exp_name)
        tags = {
            "mlflow.parentRunId": parent_id,
            "mlflow.runName": f"{stage}" + (f" [{exp_name}]" if exp_name else ""),
            "stage": stage,
            "git_commit": commit,
            "dvc_exp_name": exp_name,
            "params_changed": ", ".join(f"{k}={v}" for k, v in sorted(changed.items())) or "baseline",
        }
        run = client.create_run(experiment_id, tags=tags)
        run_id = run.info.run_id
        _log_params(client, run_id, flatten(tree))
        stage_dir.mkdir(parents=True, exist_ok=True)
        tracker = cls(client, run_id, stage_dir)
        log.info("%s: MLflow run %s (parent %s) in %s", stage, run_id[:8], parent_id[:8], uri)
        try:
            yield tracker
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            client.set_terminated(parent_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        client.set_terminated(parent_id, "FINISHED")

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        """Final numbers: nested dict -> MLflow (`val/cIoU`) and the DVC metrics JSON (`val.cIoU`)."""
        _merge(self._metrics, metrics)
        self._log_batch(flatten(metrics, sep="/"), step=None)
        atomic.write_json(self.metrics_file, self._metrics)

    def log_epoch(self, plot: str, epoch: int, values: dict[str, float]) -> None:
        """One row of a per-epoch curve: MLflow metrics at step=epoch and `<stage_dir>/plots/<plot>.csv`."""
        row = {"epoch": epoch, **values}
        self._plots.setdefault(plot, []).append(row)
        self._log_batch(values, step=epoch)
        rows = self._plots[plot]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic.write_text(self.stage_dir / "plots" / f"{plot}.csv", buffer.getvalue())

    def restore_epochs(self, plot: str, rows: list[dict[str, Any]]) -> None:
        """Re-seed a curve after a resume so the CSV keeps the epochs of the first attempt."""
        self._plots[plot] = list(rows)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifacts(self.run_id, str(folder), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def _log_batch(self, values: dict[str, Any], step: int | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step or 0) for k, v in values.items() if _is_number(v)]
        for i in range(0, len(metrics), 500):
            self._client.log_batch(self.run_id, metrics=metrics[i:i + 500])


# -- internals ---------------------------------------------------------------

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


def _parent_run(client: Any, experiment_id: str, stage: str, key: str, exp_name: str) -> str:
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
        "dvc_exp_name": exp_name,
    })
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
