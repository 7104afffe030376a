"""The pipeline as users drive it: real `dvc repro` and `dvc exp run -S` in a scratch git repository."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def sh(cwd: Path, *args: str, env: dict | None = None) -> str:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory, micro_params):
    """A git repository holding this project with micro params committed (the baseline)."""
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("stages", "jurassiglip", ".dvc"):
        shutil.copytree(REPO / folder, root / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache", "*.lock"))
    (root / "params.yaml").write_text(yaml.safe_dump(micro_params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "JURASSIGLIP_PARENT_RUN_ID"):
        env.pop(var, None)
    sh(root, "git", "init", "-q")
    sh(root, "git", "add", "-A")
    sh(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")
    return root, env


def test_repro_build_manifest_twice_does_nothing_the_second_time(project):
    root, env = project
    first = sh(root, sys.executable, "-m", "dvc", "repro", "build_manifest", env=env)
    assert "Running stage 'build_manifest'" in first
    second = sh(root, sys.executable, "-m", "dvc", "repro", "build_manifest", env=env)
    assert "Running stage" not in second and "didn't change" in second
    shown = sh(root, sys.executable, "-m", "dvc", "metrics", "show", "--json", env=env)
    assert "samples_per_split" in shown


def test_exp_run_set_param_reaches_dvc_and_mlflow(project):
    root, env = project
    sh(root, sys.executable, "-m", "dvc", "exp", "run", "-S", "lora.r=4", "-n", "rank4", env=env)
    rows = list(csv.DictReader(io.StringIO(sh(root, sys.executable, "-m", "dvc", "exp", "show", "--csv",
                                              env=env))))
    exp = next(r for r in rows if r["Experiment"] == "rank4")
    baseline = next(r for r in rows if r["rev"] not in ("workspace", "") and not r["Experiment"])
    assert exp["lora.r"] == "4" and baseline["lora.r"] == "8", rows
    assert float(exp["val.cIoU"]) >= 0.0  # evaluate's metrics are part of the experiment
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jurassiglip")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.dvc_exp_name = 'rank4'")
    stages = {r.data.tags["stage"] for r in runs if "stage" in r.data.tags}
    assert {"contrastive_pretrain", "seg_finetune", "evaluate", "render_val"} <= stages
    for run in runs:
        if "stage" in run.data.tags:
            assert run.data.params["lora.r"] == "4"
            assert run.data.tags["params_changed"] == "lora.r=4"
            assert run.info.status == "FINISHED"
