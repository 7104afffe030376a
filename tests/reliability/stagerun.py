"""Helpers of the reliability tests: throw-away projects, stages run for real, a socket-level network block.

A project here is a folder with a params.yaml and an empty dvc.yaml (so the
tracking code takes it for the repository root and puts its own mlflow.db
there), exactly as tests/stages/test_pipeline.py prepares one. Stages run
either as real subprocesses (`python -m stages.<name>`) or in this process
through their real `main()`.
"""

from __future__ import annotations

import atexit
import fcntl
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from jurassiglip.model import checkpoint

PYTHON = sys.executable
# Variables of the caller's shell that would send a test project's runs elsewhere.
FOREIGN_ENV = ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "JURASSIGLIP_PARENT_RUN_ID", "JURASSIGLIP_PARAMS")
NET_LOG_ENV = "JURASSIGLIP_TEST_NET_LOG"

# Installed as sitecustomize.py in front of a subprocess's PYTHONPATH: Python imports it
# at start-up, before any project code. Every attempt to reach another host through the
# socket module (connect, connect_ex, sendto on a non-AF_UNIX socket, create_connection,
# name resolution) is appended to the log file and refused. AF_UNIX sockets are allowed:
# they never leave the machine.
NETWORK_BLOCKER = '''
import json, os, socket

_LOG = os.environ["%(env)s"]


def _refuse(call, target):
    with open(_LOG, "a") as log:
        log.write(json.dumps({"pid": os.getpid(), "call": call, "target": repr(target)}) + "\\n")
    raise OSError(f"network blocked by the test: {call} {target!r}")


def _guard(method, call):
    def guarded(self, *args):
        if self.family == socket.AF_UNIX:
            return method(self, *args)
        return _refuse(call, args[-1] if args else None)
    return guarded


socket.socket.connect = _guard(socket.socket.connect, "connect")
socket.socket.connect_ex = _guard(socket.socket.connect_ex, "connect_ex")
socket.socket.sendto = _guard(socket.socket.sendto, "sendto")
socket.create_connection = lambda address, *a, **k: _refuse("create_connection", address)
socket.getaddrinfo = lambda host, *a, **k: _refuse("getaddrinfo", host)
socket.gethostbyname = lambda host: _refuse("gethostbyname", host)
socket.gethostbyname_ex = lambda host: _refuse("gethostbyname_ex", host)
''' % {"env": NET_LOG_ENV}


_TEMPLATE: list[Path] = []


def empty_store(root: Path) -> None:
    """Put an MLflow sqlite store with its tables but no experiment or run at root/mlflow.db.

    MLflow builds a new store by running all its schema migrations (seconds of
    CPU); the tests make many projects, so the tables are built once per
    session and copied.
    """
    if not _TEMPLATE:
        folder = Path(tempfile.mkdtemp(prefix="jurassiglip-store-"))
        atexit.register(shutil.rmtree, folder, True)
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
        _TEMPLATE.append(folder / "mlflow.db")
    shutil.copy(_TEMPLATE[0], root / "mlflow.db")


def make_project(root: Path, params: dict) -> Path:
    """A project folder holding `params` as params.yaml, and an empty MLflow store."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text("stages: {}\n")
    empty_store(root)
    return root


def copy_stage_outputs(src: Path, dst: Path, *stages: str) -> None:
    """Copy data/<stage> of finished stages from one project to another (the inputs of a later stage)."""
    for stage in stages:
        shutil.copytree(src / "data" / stage, dst / "data" / stage)


def clone_project(src: Path, dst: Path) -> Path:
    """A full copy of a project (params, outputs, MLflow store)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def stage_env(root: Path, **extra: str) -> dict[str, str]:
    """This process's environment without foreign tracking variables, reading root/params.yaml."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env["JURASSIGLIP_PARAMS"] = str(root / "params.yaml")
    env.update(extra)
    return env


def offline_env(root: Path, blocker_dir: Path, log: Path) -> dict[str, str]:
    """stage_env with the network blocked and every attempt recorded in `log`."""
    blocker_dir.mkdir(parents=True, exist_ok=True)
    (blocker_dir / "sitecustomize.py").write_text(NETWORK_BLOCKER)
    path = os.pathsep.join(p for p in (str(blocker_dir), os.environ.get("PYTHONPATH", "")) if p)
    return stage_env(root, PYTHONPATH=path, **{NET_LOG_ENV: str(log)})


def run_stage(root: Path, stage: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m stages.<stage>` in `root`, as DVC would run it."""
    return subprocess.run([PYTHON, "-m", f"stages.{stage}"], cwd=root, env=env or stage_env(root),
                          capture_output=True, text=True, timeout=900)


def kill_when(root: Path, stage: str, marker: str, pipe_bytes: int = 4096, sig: int = signal.SIGKILL) -> str:
    """Start `stage` in `root`, send it `sig` as soon as its log shows `marker`; return the log up to then.

    The log goes into a pipe shrunk to `pipe_bytes`: after the marker the test
    stops reading, so the stage can write at most that much more before it
    blocks. As long as the rest of the run would log more, the kill lands
    before the stage can finish, whatever the speed of the machine. A signal
    the stage handles (SIGTERM) lets it log on its way out, so the rest of the
    log is drained then (and returned too); the exit code must be 128 + sig.
    """
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), pipe_bytes)
    proc = subprocess.Popen([PYTHON, "-m", f"stages.{stage}"], cwd=root, env=stage_env(root),
                            stdout=subprocess.DEVNULL, stderr=write_end)
    os.close(write_end)
    seen = []
    with os.fdopen(read_end, "r", errors="replace") as log:
        try:
            for line in log:
                seen.append(line)
                if marker in line:
                    break
        finally:
            proc.send_signal(sig)
            if sig != signal.SIGKILL:
                seen.extend(log)  # until the stage closes its end
            proc.wait(timeout=120)
    text = "".join(seen)
    assert marker in text, f"{stage} ended before logging {marker!r}:\n{text[-3000:]}"
    expected = -signal.SIGKILL if sig == signal.SIGKILL else 128 + sig
    assert proc.returncode == expected, (proc.returncode, text[-3000:])
    return text


def project_like(src: Path, dst: Path, *stages: str) -> Path:
    """A new project with the params of `src`, copies of the outputs of `stages` and an empty MLflow store."""
    dst.mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(src / name, dst / name)
    empty_store(dst)
    copy_stage_outputs(src, dst, *stages)
    return dst


def run_in_process(root: Path, *stages: str, **env: str) -> None:
    """The stages' real main() in this process, with `root` as the working directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for var in FOREIGN_ENV:
            mp.delenv(var, raising=False)
        mp.setenv("JURASSIGLIP_PARAMS", str(root / "params.yaml"))
        for name, value in env.items():
            mp.setenv(name, value)
        for stage in stages:
            importlib.import_module(f"stages.{stage}").main()


def stage_refusal(root: Path, stage: str, caplog: pytest.LogCaptureFixture, **env: str) -> str:
    """Run a stage that bad input must stop: exit code 2 and one logged error line, no traceback; the line.

    The whole log (INFO and up) stays in `caplog` for the caller to check what did not happen.
    """
    import logging

    caplog.clear()
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
        run_in_process(root, stage, **env)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert exit_info.value.code == 2, caplog.text
    assert len(errors) == 1 and errors[0].exc_info is None, caplog.text
    line = errors[0].getMessage()
    assert "\n" not in line, line
    return line


def stage_runs(root: Path, stage: str) -> list:
    """The MLflow runs of one stage in the project's own store, oldest first."""
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jurassiglip")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.stage = '{stage}'")
    return sorted(runs, key=lambda r: r.info.start_time)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    """Bit-identical state dicts (CPU runs of the same seed must not differ in the last bit)."""
    wa, wb = weights(a), weights(b)
    assert list(wa) == list(wb)
    different = [name for name in wa if not torch.equal(wa[name], wb[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def metrics(root: Path, stage: str) -> dict:
    return json.loads((root / "data" / stage / "metrics.json").read_text())
