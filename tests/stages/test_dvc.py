"""The pipeline as users drive it, in a scratch git repository holding this project on micro params.

Real `dvc repro`, then `dvc exp run -S` three ways: in the workspace, with
`--temp` and through the queue (`--queue` + `dvc queue start`). Each is checked
where a user looks: `dvc exp show` and the one MLflow store at the
repository's root (never the copy DVC runs an experiment in under
`.dvc/tmp/exps/`, which is deleted afterwards).

The tests share one repository (module scope) to keep the time down; each
restores the workspace's tracked files when it is done, so none depends on
another's leftovers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
import yaml
from mlflow.tracking import MlflowClient

from jurassiglip.runtime.codedeps import stage_code_deps
from jurassiglip.config import flatten, resolve_choices
from jurassiglip.runtime.paths import STAGES

REPO = Path(__file__).resolve().parents[2]
METRIC_KEYS = ["cIoU", "gIoU", "Pr_0.5", "Pr_0.7", "Pr_0.9", "N_acc", "T_acc"]
TRAINING_STAGES = ("contrastive_pretrain", "seg_finetune")
EPOCHS = 2  # two points per loss curve
QUEUE_GUARD_SECONDS = 1200  # only stops a hung queue worker from hanging the test run; no speed is asserted

pytestmark = pytest.mark.slow


@dataclass
class Project:
    root: Path
    env: dict[str, str]
    baseline_commit: str  # the commit the baseline pipeline ran at

    def sh(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True)
        if ok:
            assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
        return out

    def dvc(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        return self.sh(sys.executable, "-m", "dvc", *args, ok=ok)

    def reset(self) -> None:
        """Undo what a workspace experiment leaves in tracked files (params.yaml, dvc.lock, metrics)."""
        self.sh("git", "checkout", "-q", "--", ".")

    def client(self) -> MlflowClient:
        return MlflowClient(f"sqlite:///{self.root / 'mlflow.db'}")

    def runs(self, exp_name: str) -> tuple[list[Any], list[Any]]:
        """(stage runs, pipeline parent runs) of one DVC experiment name ('' = plain `dvc repro`)."""
        client = self.client()
        experiment = client.get_experiment_by_name("jurassiglip")
        runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.dvc_exp_name = '{exp_name}'")
        return [r for r in runs if "stage" in r.data.tags], [r for r in runs if "stage" not in r.data.tags]

    def exp_show(self) -> dict[str, dict[str, dict[str, Any]]]:
        """`dvc exp show --json` as {name: {'params': flat params.yaml, 'metrics': flat evaluate metrics}};
        the committed baseline is under 'baseline'."""
        rows: dict[str, dict[str, dict[str, Any]]] = {}

        def add(name: str, entry: dict) -> None:
            data = entry.get("data") or {}
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
            metrics = ((data.get("metrics") or {}).get("data/evaluate/metrics.json") or {}).get("data") or {}
            rows[name] = {"params": flatten(params), "metrics": flatten(metrics)}

        for top in json.loads(self.dvc("exp", "show", "--json").stdout):
            if top["rev"] == "workspace":
                continue
            add("baseline", top)
            for group in top.get("experiments") or []:
                for rev in group["revs"]:
                    add(rev.get("name") or rev["rev"], rev)
        return rows

    def queue_status(self) -> dict[str, str]:
        """`dvc queue status` as {experiment name: Queued | Running | Success | Failed | ...}."""
        status = {}
        for line in self.dvc("queue", "status").stdout.splitlines():
            words = line.split()
            if len(words) >= 4 and words[0] != "Task" and not line.startswith("Worker"):
                status[words[1]] = words[-1]
        return status


def artifact_file(run: Any, *parts: str) -> Path:
    """Where a run's artifact lives on disk (the default store keeps them under the root's mlartifacts/)."""
    return Path(unquote(urlparse(run.info.artifact_uri).path), *parts)


@pytest.fixture(scope="module")
def project(tmp_path_factory, micro_params):
    """This project in a fresh git repository, micro params committed, `dvc repro` run and its results
    committed: the baseline every experiment below is compared with."""
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("stages", "jurassiglip", ".dvc"):
        shutil.copytree(REPO / folder, root / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache", "*.lock"))
    params = {**micro_params, "pretrain": {**micro_params["pretrain"], "epochs": EPOCHS},
              "finetune": {**micro_params["finetune"], "epochs": EPOCHS}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "JURASSIGLIP_PARENT_RUN_ID", "JURASSIGLIP_PARAMS"):
        env.pop(var, None)
    git = ("git", "-c", "user.name=t", "-c", "user.email=t@t")
    project = Project(root, env, "")
    project.sh("git", "init", "-q")
    project.sh("git", "add", "-A")
    project.sh(*git, "commit", "-qm", "code and params")
    project.baseline_commit = project.sh("git", "rev-parse", "HEAD").stdout.strip()
    out = project.dvc("repro")
    assert all(f"Running stage '{stage}'" in out.stdout for stage in STAGES), out.stdout
    project.sh("git", "add", "-A")
    project.sh(*git, "commit", "-qm", "baseline results")
    yield project
    project.dvc("queue", "stop", ok=False)  # a worker left over by a failed queue test


def test_repro_again_does_nothing_and_metrics_show_every_stage(project):
    out = project.dvc("repro")
    assert "Running stage" not in out.stdout
    shown = project.dvc("metrics", "show", "--json").stdout
    for stage in STAGES:
        assert f"data/{stage}/metrics.json" in shown


def test_editing_any_module_a_stage_imports_makes_dvc_status_report_it(project):
    """For each stage, one module of its code that no upstream stage imports (where there is one) is edited:
    `dvc status` reports it as a changed dep of exactly the stages that import it."""
    code = {stage: set(stage_code_deps(stage, project.root)) for stage in STAGES}
    for index, stage in enumerate(STAGES):
        upstream = set().union(*(code[s] for s in STAGES[:index]))
        modules = sorted(p for p in code[stage] if p.startswith("jurassiglip/"))
        own = [p for p in modules if p not in upstream] or modules
        edited = min(own, key=lambda p: (sum(p in code[s] for s in STAGES), p))  # the most specific
        path = project.root / edited
        path.write_text(path.read_text() + "# edited by test_dvc\n")
        try:
            status = json.loads(project.dvc("status", "--json").stdout)
        finally:
            project.reset()
        reported = {name for name, changes in status.items()
                    if any(edited in (c.get("changed deps") or {}) for c in changes if isinstance(c, dict))}
        assert stage in reported, (edited, status)
        assert reported == {s for s in STAGES if edited in code[s]}, (edited, status)


def test_every_stage_run_has_params_tags_curves_metrics_and_artifacts(project):
    runs, parents = project.runs("")
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert sorted(by_stage) == sorted(STAGES) and len(runs) == len(STAGES)
    assert len(parents) == 1
    parent = parents[0]
    # per-choice knobs (pretrain.lr: {tiny: ..., real: ...}) are recorded as the active value
    flat = flatten(resolve_choices(yaml.safe_load((project.root / "params.yaml").read_text())))
    assert flat["pretrain.lr"] == 3.0e-3 and "pretrain.lr.tiny" not in flat
    for run in [*runs, parent]:
        assert run.info.status == "FINISHED"
        assert set(run.data.params) == set(flat), set(run.data.params) ^ set(flat)
        assert run.data.params["lora.r"] == "8" and run.data.params["pretrain.lr"] == str(flat["pretrain.lr"])
        assert run.data.tags["git_commit"] == project.baseline_commit
        assert run.data.tags["params_changed"] == "baseline"
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.artifact_uri.startswith((project.root / "mlartifacts").as_uri())

    client = project.client()
    for stage in TRAINING_STAGES:  # per-epoch curves, as steps of one metric
        for name in ("train_loss", "val_loss"):
            history = client.get_metric_history(by_stage[stage].info.run_id, name)
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), (stage, name)

    evaluate = by_stage["evaluate"]
    on_disk = flatten(yaml.safe_load((project.root / "data/evaluate/metrics.json").read_text()), sep="/")
    for split in ("val", "test"):
        for prefix in ("", "baseline_shuffled_text/", "baseline_union/", "single/", "multi/", "no_target/"):
            for key in METRIC_KEYS:
                name = f"{split}/{prefix}{key}"
                assert evaluate.data.metrics[name] == pytest.approx(on_disk[name]), name
    assert "no-target" in evaluate.data.tags["no_target_rule"]
    # the pipeline's parent row carries evaluate's numbers, so two pipelines compare directly
    assert "val/cIoU" in parent.data.metrics
    assert all(evaluate.data.metrics[k] == v for k, v in parent.data.metrics.items())
    assert {"samples.csv", "samples.parquet"} <= {a.path for a in client.list_artifacts(evaluate.info.run_id)}
    assert artifact_file(evaluate, "samples.csv").read_text().startswith("sample_id")

    gallery = [a.path for a in client.list_artifacts(by_stage["render_val"].info.run_id, "gallery")]
    assert "gallery/index.html" in gallery and any(p.endswith(".png") for p in gallery)


def test_exp_run_in_the_workspace_shows_in_dvc_and_mlflow(project):
    try:
        project.dvc("exp", "run", "-S", "lora.r=16", "-n", "rank16")
        shown = project.exp_show()
    finally:
        project.reset()
    assert shown["rank16"]["params"]["lora.r"] == 16 and shown["baseline"]["params"]["lora.r"] == 8
    # evaluate's metrics belong to the experiment: retrained with another rank, not the baseline's
    assert shown["rank16"]["metrics"]["val.cIoU"] != shown["baseline"]["metrics"]["val.cIoU"]

    runs, parents = project.runs("rank16")
    # build_manifest does not depend on lora.r, so DVC skips it
    assert sorted(r.data.tags["stage"] for r in runs) == sorted(set(STAGES) - {"build_manifest"})
    for run in [*runs, *parents]:
        assert run.data.params["lora.r"] == "16"
        assert run.data.tags["params_changed"] == "lora.r=16"
        assert run.info.status == "FINISHED"
    evaluate = next(r for r in runs if r.data.tags["stage"] == "evaluate")
    assert evaluate.data.metrics["val/cIoU"] == pytest.approx(shown["rank16"]["metrics"]["val.cIoU"])


def test_temp_experiment_records_into_the_root_store(project):
    project.dvc("exp", "run", "--temp", "-S", "evaluate.mask_threshold=0.35", "-n", "temp-thr")
    shown = project.exp_show()
    assert shown["temp-thr"]["params"]["evaluate.mask_threshold"] == 0.35
    assert shown["temp-thr"]["metrics"]["mask_threshold"] == 0.35

    runs, parents = project.runs("temp-thr")
    assert {"evaluate", "render_val"} <= {r.data.tags["stage"] for r in runs}
    for run in [*runs, *parents]:
        assert run.data.params["evaluate.mask_threshold"] == "0.35"
        assert run.data.tags["params_changed"] == "evaluate.mask_threshold=0.35"
        assert run.info.status == "FINISHED"
    # the temporary copy is gone; its run's artifacts stayed beside the root store
    evaluate = next(r for r in runs if r.data.tags["stage"] == "evaluate")
    assert artifact_file(evaluate, "samples.csv").is_file()
    # The feature cache is not in DVC's cache, so seg_finetune reruns in the copy and finds its training
    # complete in latest.safetensors: the run must still carry the whole loss curve (and DVC get its plot file).
    for run in runs:
        if run.data.tags["stage"] in TRAINING_STAGES:
            history = project.client().get_metric_history(run.info.run_id, "val_loss")
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))


@pytest.fixture(scope="module")
def queued(project):
    """Two experiments queued, then run by one `dvc queue start` worker: a good one and one whose
    -S value params validation rejects. Yields `dvc queue status` once both are done."""
    names = ("queued-r4", "queued-bad")
    project.dvc("exp", "run", "--queue", "-S", "lora.r=4", "-n", names[0])
    project.dvc("exp", "run", "--queue", "-S", "render.split=train", "-n", names[1])  # train is not evaluated
    assert {project.queue_status()[n] for n in names} == {"Queued"}
    project.dvc("queue", "start", "-j", "1")
    guard = time.monotonic() + QUEUE_GUARD_SECONDS
    while True:
        status = project.queue_status()
        if all(status.get(n) not in ("Queued", "Running") for n in names):
            break
        if time.monotonic() > guard:
            logs = [project.dvc("queue", "logs", n, ok=False).stdout[-3000:] for n in names]
            pytest.fail(f"queue still busy: {status}\n" + "\n".join(logs))
        time.sleep(3)
    return status


def test_queued_experiment_shows_in_dvc_and_records_into_the_root_store(project, queued):
    assert queued["queued-r4"] == "Success"
    shown = project.exp_show()
    assert shown["queued-r4"]["params"]["lora.r"] == 4
    assert shown["queued-r4"]["metrics"]["val.cIoU"] != shown["baseline"]["metrics"]["val.cIoU"]  # retrained

    runs, parents = project.runs("queued-r4")
    assert sorted(r.data.tags["stage"] for r in runs) == sorted(set(STAGES) - {"build_manifest"})
    assert len(parents) == 1
    for run in [*runs, *parents]:
        assert run.data.params["lora.r"] == "4"
        assert run.data.tags["params_changed"] == "lora.r=4"
        assert run.info.status == "FINISHED"
    render = next(r for r in runs if r.data.tags["stage"] == "render_val")
    assert any(artifact_file(render, "gallery").glob("*.png"))


def test_failed_experiment_is_a_failed_mlflow_run(project, queued):
    assert queued["queued-bad"] == "Failed"
    runs, parents = project.runs("queued-bad")
    assert len(runs) == 1 and len(parents) == 1  # DVC stops the experiment at the first stage that fails
    failed = runs[0]
    assert failed.info.status == "FAILED" and parents[0].info.status == "FAILED"
    assert failed.data.params["render.split"] == "train"
    assert failed.data.tags["params_changed"] == "render.split=train"
    assert "render.split" in failed.data.tags["error"]
