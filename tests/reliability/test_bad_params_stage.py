"""Bad params stop a real stage entry before any work: exit code 2, the key and value in the log, no output.

The cases per section live in tests/test_config_errors.py (at the loader);
here a few of them go through `main()` of a data stage and of a training
stage whose inputs are all in place, so the only thing between the stage and
its work is the params check.
"""

from __future__ import annotations

import logging

import pytest
import yaml
from stagerun import project_like, run_in_process, stage_runs

CASES = [
    ("lora.r", 0, "lora.r = 0 must be > 0"),
    ("launcher.command", "python -m stages.seg_finetune", "launcher.command = 'python -m stages.seg_finetune'"),
    ("render.split", "train", "render.split = 'train' is not evaluated"),
    ("seed", -1, "seed = -1 must be in [0, 2**63)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["build_manifest", "seg_finetune"])
@pytest.mark.parametrize("key, value, message", CASES, ids=[k for k, _, _ in CASES])
def test_bad_params_stop_the_stage_before_any_work(reference_run, tmp_path, caplog, stage, key, value, message):
    upstream = [] if stage == "build_manifest" else ["build_manifest", "contrastive_pretrain"]
    root = project_like(reference_run.root, tmp_path / "project", *upstream)
    params = yaml.safe_load((root / "params.yaml").read_text())
    *path, leaf = key.split(".")
    node = params
    for part in path:
        node = node[part]
    node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    before = sorted(p.relative_to(root) for p in (root / "data").rglob("*")) if upstream else None

    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        run_in_process(root, stage)

    assert exit_info.value.code == 2
    assert message in caplog.text and "params.yaml" in caplog.text
    if upstream:
        assert sorted(p.relative_to(root) for p in (root / "data").rglob("*")) == before
    else:
        assert not (root / "data").exists()
    assert [r.info.status for r in stage_runs(root, stage)] in ([], ["FAILED"])  # nothing, or a failed run
