"""An interrupted training stage resumes when the user runs the same DVC command again.

A scratch git + DVC repository holds this project on micro params with a
committed baseline (`dvc repro`), as a user's repository would. Each test
starts a command the way a user does, stops it inside epoch 2 of
seg_finetune, runs the same command again and reads, in the stage's own
log, the epoch it resumed after:

| command | stopped by | resumes from |
| --- | --- | --- |
| `dvc repro` | SIGKILL to the process group | `data/seg_finetune/checkpoints/` (`persist: true`) |
| `dvc exp run -S ...` | SIGTERM to the process group | `.dvc/tmp/resume/...` (DVC first checks out dvc.lock's outs) |
| `dvc exp run --temp -S ...` | SIGKILL to the process group | `.dvc/tmp/resume/...` (the copy it ran in is gone) |
| `dvc exp run --queue -S ...` + `dvc queue start` | SIGTERM to the stage | `.dvc/tmp/resume/...` |

The foreground commands log into a pipe shrunk to 4 KiB that the test stops
reading at "epoch 2 step 1/" of seg_finetune (its epochs log ~5 KiB each), so
the signal lands inside epoch 2 whatever the machine's speed (as in
tests/reliability/stagerun.py `kill_when`). A queued experiment logs into a
file: the test waits for the run's resume copy to hold a finished epoch,
signals the stage, and reads the epoch the copy holds afterwards; its 12
epochs leave the signal ample time to land before the end.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from jurassiglip.model import checkpoint

REPO = Path(__file__).resolve().parents[2]
COPIES = Path(".dvc/tmp/resume/data/seg_finetune/checkpoints")
OUTPUT = Path("data/seg_finetune/checkpoints")
MARKERS = ("seg_finetune: start", "epoch 2 step 1/")
# seg_finetune in 3 epochs of ~50 logged steps (batch 4): long enough to be stopped inside epoch 2
LONG_FINETUNE = ("-S", "finetune.epochs=3", "-S", "finetune.batch_size=4", "-S", "finetune.log_every=1")
QUEUE_GUARD_SECONDS = 1200  # only keeps a hung queue from hanging the test run; no speed is asserted

pytestmark = pytest.mark.slow


@dataclass
class Project:
    root: Path
    env: dict[str, str]

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True)
        if ok:
            assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out

    def dvc(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, ok=ok)

    def reset(self) -> None:
        """Undo what a workspace run leaves in tracked files (params.yaml, dvc.lock, metrics)."""
        self.run("git", "checkout", "-q", "--", ".")

    def interrupt(self, sig: int, *args: str) -> str:
        """Start `dvc <args>`, send `sig` to its whole process group (DVC and the stage) inside epoch 2 of
        seg_finetune; return the log up to then. Returns once every process of the group has exited."""
        read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
        proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=self.root, env=self.env,
                                stdout=write_end, stderr=write_end, start_new_session=True)
        os.close(write_end)
        seen = ""
        with os.fdopen(read_end, "r", errors="replace") as log:
            try:
                for line in log:
                    seen += line
                    if MARKERS[0] in seen and MARKERS[1] in line:
                        break
            finally:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=120)
                log.read()  # end of file: every process that held the pipe (the stage too) has exited
        assert MARKERS[1] in seen, f"dvc {' '.join(args)} ended before seg_finetune's epoch 2:\n{seen[-3000:]}"
        return seen

    def rerun(self, *args: str) -> str:
        """`dvc <args>` to the end; its whole output (the stages' logs included)."""
        out = self.dvc(*args)
        return out.stdout + out.stderr


def resumed_after(log: str) -> list[tuple[str, int]]:
    """(checkpoint path, epoch) of every "resuming from ... after epoch N" line of seg_finetune in `log`."""
    part = log[log.index("seg_finetune: start"):]
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"resuming from (\S+) after epoch (\d+)", part)]


@pytest.fixture(scope="module")
def project(tmp_path_factory, micro_params):
    """This project in a fresh git repository on micro params, `dvc repro` run and committed (the baseline)."""
    root = tmp_path_factory.mktemp("resume") / "project"
    root.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("stages", "jurassiglip", ".dvc"):
        shutil.copytree(REPO / folder, root / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache", "*.lock"))
    params = {**micro_params, "data": {**micro_params["data"], "splits": ["train", "val"]},
              "evaluate": {**micro_params["evaluate"], "splits": ["val"]}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "JURASSIGLIP_PARENT_RUN_ID", "JURASSIGLIP_PARAMS"):
        env.pop(var, None)
    project = Project(root, env)
    git = ("git", "-c", "user.name=t", "-c", "user.email=t@t")
    project.run("git", "init", "-q")
    project.run("git", "add", "-A")
    project.run(*git, "commit", "-qm", "code and params")
    project.dvc("repro")
    project.run("git", "add", "-A")
    project.run(*git, "commit", "-qm", "baseline results")
    yield project
    project.dvc("queue", "stop", ok=False)


def test_interrupted_dvc_repro_resumes_from_the_persisted_output(project):
    params = project.root / "params.yaml"
    values = yaml.safe_load(params.read_text())
    values["finetune"].update(epochs=3, batch_size=4, log_every=1, lr=2e-3)
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    try:
        project.interrupt(signal.SIGKILL, "repro")
        log = project.rerun("repro")
    finally:
        project.reset()
    assert resumed_after(log) == [(str(OUTPUT / checkpoint.LATEST), 1)], log[-3000:]
    assert "epoch 3/3" in log


def test_interrupted_workspace_experiment_resumes_from_the_resume_copy(project):
    command = ("exp", "run", *LONG_FINETUNE, "-S", "finetune.lr=2.5e-3", "-n", "ws-resumed")
    try:
        project.interrupt(signal.SIGTERM, *command)
        log = project.rerun(*command)
    finally:
        project.reset()
    [(path, epoch)] = resumed_after(log)
    assert epoch == 1 and Path(path).parent.parent == project.root / COPIES, path
    # DVC checked out the baseline's checkpoints (another run) over the interrupted run's
    assert f"{OUTPUT / checkpoint.LATEST} belongs to another run" in log
    assert "epoch 3/3" in log
    assert "ws-resumed" in project.dvc("exp", "show", "--json").stdout


def test_interrupted_temp_experiment_resumes_from_the_resume_copy(project):
    command = ("exp", "run", "--temp", *LONG_FINETUNE, "-S", "finetune.lr=3.5e-3", "-n", "temp-resumed")
    project.interrupt(signal.SIGKILL, *command)
    log = project.rerun(*command)
    [(path, epoch)] = resumed_after(log)
    assert epoch == 1 and Path(path).parent.parent == project.root / COPIES, path
    assert "epoch 3/3" in log
    assert "temp-resumed" in project.dvc("exp", "show", "--json").stdout


def stage_processes(root: Path, stage: str) -> list[int]:
    """Pids of `python -m stages.<stage>` processes running anywhere under `root` (DVC's copies included)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone, or not ours to read
            continue
        if b"-m" in args and f"stages.{stage}".encode() in args and Path(cwd).is_relative_to(root):
            pids.append(int(entry.name))
    return pids


def queue_rows(project: Project) -> list[tuple[str, str, str]]:
    """`dvc queue status` as (task, name, status) rows, oldest first."""
    rows = []
    for line in project.dvc("queue", "status").stdout.splitlines():
        words = line.split()
        if len(words) >= 4 and words[0] != "Task" and not line.startswith("Worker"):
            rows.append((words[0], words[1], words[-1]))
    return rows


def wait_for_queue(project: Project, name: str, runs: int) -> list[tuple[str, str, str]]:
    """Wait until `runs` queued experiments named `name` have ended; their rows."""
    guard = time.monotonic() + QUEUE_GUARD_SECONDS
    while True:
        rows = [row for row in queue_rows(project) if row[1] == name]
        if len(rows) >= runs and all(status not in ("Queued", "Running") for _, _, status in rows):
            return rows
        if time.monotonic() > guard:
            pytest.fail(f"queue still busy: {rows}")
        time.sleep(1)


def start_queue(project: Project) -> None:
    """`dvc queue start`: its worker keeps the output pipes open until the queue is empty, so no pipes."""
    subprocess.Popen([sys.executable, "-m", "dvc", "queue", "start", "-j", "1"], cwd=project.root, env=project.env,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True).wait()


def test_interrupted_queued_experiment_resumes_when_queued_again(project):
    name = "queued-resumed"
    command = ("exp", "run", "--queue", "-S", "finetune.epochs=12", "-S", "finetune.patience=12",
               "-S", "finetune.lr=4.5e-3", "-n", name)
    before = set((project.root / COPIES).iterdir())
    project.dvc(*command)
    start_queue(project)
    guard = time.monotonic() + QUEUE_GUARD_SECONDS
    while True:  # until the run's resume copy holds a finished epoch
        new = [p for p in (project.root / COPIES).iterdir() if p not in before and (p / checkpoint.LATEST).is_file()]
        if new:
            break
        assert time.monotonic() < guard, queue_rows(project)
        time.sleep(0.2)
    [copy] = new
    pids = stage_processes(project.root, "seg_finetune")
    assert pids, "seg_finetune is not running"
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    [(_, _, status)] = wait_for_queue(project, name, 1)
    assert status == "Failed"
    done = checkpoint.load(copy / checkpoint.LATEST)["state"]["epoch"]
    assert 1 <= done < 12, f"the queued run was not stopped inside its training (epoch {done})"

    project.dvc(*command)  # the same command again
    start_queue(project)
    rows = wait_for_queue(project, name, 2)
    task, _, status = rows[-1]
    assert status == "Success", rows
    log = project.dvc("queue", "logs", task).stdout
    assert resumed_after(log) == [(str(copy / checkpoint.LATEST), done)], log[-3000:]
    assert "epoch 12/12" in log
