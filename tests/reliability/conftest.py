"""The reference run the reliability tests compare against: all five stages, as subprocesses, offline.

It is run once per session and only read afterwards: tests that need to
change something copy what they need into a project of their own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
from stagerun import kill_when, make_project, offline_env, project_like, run_stage

from jurassiglip.runtime.paths import STAGES


@dataclass(frozen=True)
class ReferenceRun:
    root: Path            # the project folder
    connections: Path     # what the network blocker recorded (absent = nothing)
    logs: dict[str, str]  # stderr of each stage


@pytest.fixture(scope="session")
def reliability_params(micro_params) -> dict:
    """The micro config with a stage 2 long enough to be killed inside a later epoch (3 epochs of ~50 steps),
    and without the test split (evaluating val is enough here and saves time)."""
    params = copy.deepcopy(micro_params)
    params["finetune"].update(epochs=3, batch_size=4, log_every=1)
    params["data"]["splits"] = ["train", "val"]
    params["evaluate"]["splits"] = ["val"]
    return params


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, reliability_params) -> ReferenceRun:
    """build_manifest -> ... -> render_val, each `python -m stages.<name>` with the network blocked."""
    base = tmp_path_factory.mktemp("reference")
    root = make_project(base / "project", reliability_params)
    connections = base / "connections.jsonl"
    env = offline_env(root, base / "netblock", connections)
    logs = {}
    for stage in STAGES:
        result = run_stage(root, stage, env)
        logs[stage] = result.stderr
        assert result.returncode == 0, f"{stage} failed:\n{result.stderr[-4000:]}"
    return ReferenceRun(root, connections, logs)


@pytest.fixture(scope="session")
def killed(tmp_path_factory, reference_run) -> Path:
    """A project whose seg_finetune was SIGKILLed inside epoch 2, after epoch 1's checkpoint (tests clone it).

    Epochs of ~50 steps log ~5 KiB each at log_every 1, so the 4 KiB pipe of
    `kill_when` stops the stage inside epoch 2.
    """
    root = project_like(reference_run.root, tmp_path_factory.mktemp("killed") / "project",
                        "build_manifest", "contrastive_pretrain")
    kill_when(root, "seg_finetune", "epoch 2 step 1/")
    return root
