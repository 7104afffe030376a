"""`launcher.command` reaches the two training stages' commands through DVC's own templating."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TRAINING = ("contrastive_pretrain", "seg_finetune")


def stage_commands(root: Path, launcher: str) -> dict[str, str]:
    """Stage name -> the command DVC would run, with params.yaml's launcher set to `launcher`."""
    from dvc.repo import Repo

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["launcher"]["command"] = launcher
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    if not (root / ".dvc").exists():
        Repo.init(str(root), no_scm=True)
    return {stage.name: stage.cmd for stage in Repo(str(root)).index.stages}


@pytest.mark.parametrize("launcher", ["python", "torchrun --nproc_per_node=2",
                                      "torchrun --nnodes=2 --nproc_per_node=8 --rdzv-endpoint=head:29400"])
def test_training_stages_start_with_the_launcher(tmp_path, monkeypatch, launcher):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    commands = stage_commands(tmp_path, launcher)
    for name, cmd in commands.items():
        if name in TRAINING:
            assert cmd == f"{launcher} -m stages.{name}"
        else:
            assert cmd == f"python -m stages.{name}"  # only training runs under torchrun
