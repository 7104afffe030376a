"""Bad input stops a stage in one line, like bad params: exit code 2, the file or key named, the MLflow run FAILED.

A bad gRefCOCO file, a missing upstream checkpoint, a batch larger than the
split it is drawn from, a split the manifest does not hold: each used to
end a stage with a traceback (exit 1), the batch size only after the model
was built and a validation pass had run. Each case runs a real stage entry
with everything else in place, so the only thing between the stage and its
work is the input at fault.
"""

from __future__ import annotations

import json

import pytest
import yaml
from stagerun import make_project, project_like, run_stage, stage_env, stage_refusal, stage_runs


def edit_params(root, **changes) -> None:
    """Set dotted keys of root/params.yaml."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in changes.items():
        *path, leaf = key.split(".")
        node = params
        for part in path:
            node = node[part]
        node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def files(root):
    """The files under root/data (the tracker makes the stage's folder before the stage starts)."""
    return sorted(str(p.relative_to(root)) for p in (root / "data").rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_bad_grefcoco_file_stops_build_manifest_in_one_line_on_stderr(reliability_params, tmp_path):
    """As DVC runs it (a subprocess): stderr ends with the one error line, and holds no traceback."""
    root = make_project(tmp_path / "project", {**reliability_params, "data": {**reliability_params["data"],
                                                                               "source": "grefcoco"}})
    grefcoco = root / "data" / "grefcoco"
    (grefcoco / "images").mkdir(parents=True)
    (grefcoco / "instances.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    (grefcoco / "grefs(unc).json").write_text('[{"ref_id": 1, ')  # a download cut short

    result = run_stage(root, "build_manifest", stage_env(root))

    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(
        "data/grefcoco/grefs(unc).json: malformed JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 16 (char 15)"), result.stderr  # the params path, relative to the repository
    assert not (root / "data/build_manifest/manifest").exists()
    assert not (root / "data/build_manifest/tokenizer").exists()
    (run,) = stage_runs(root, "build_manifest")
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith(
        "DataError: data/grefcoco/grefs(unc).json: malformed JSON")


@pytest.mark.slow
def test_a_missing_upstream_checkpoint_stops_the_stage_in_one_line(reference_run, tmp_path, caplog):
    root = project_like(reference_run.root, tmp_path / "project", "build_manifest")  # no contrastive_pretrain
    before = files(root)
    line = stage_refusal(root, "seg_finetune", caplog)
    assert line == "data/contrastive_pretrain/checkpoints/best.safetensors: checkpoint not found"
    assert files(root) == before
    (run,) = stage_runs(root, "seg_finetune")
    assert run.info.status == "FAILED" and run.data.tags["error"] == f"CheckpointError: {line}"


# stage, params changed, the start of the line: refused before any model is built
BEFORE_ANY_MODEL = [
    ("contrastive_pretrain", {"pretrain.batch_size": 32},  # the micro training split has 24 images
     "pretrain.batch_size = 32 is larger than the training split 'train' ("),
    ("seg_finetune", {"finetune.batch_size": 4096},  # ~10 captions per image
     "finetune.batch_size = 4096 is larger than the training split 'train' ("),
    ("contrastive_pretrain", {"data.splits": ["train", "val", "test"], "data.val_split": "test"},
     "data.val_split = 'test' is not a split of the manifest "),
    ("seg_finetune", {"data.splits": ["train", "val", "test"], "data.train_split": "test"},
     "data.train_split = 'test' is not a split of the manifest "),
]


@pytest.mark.slow
@pytest.mark.parametrize("stage, changes, message", BEFORE_ANY_MODEL,
                         ids=[f"{s}-{','.join(c)}" for s, c, _ in BEFORE_ANY_MODEL])
def test_params_that_do_not_fit_the_manifest_are_refused_before_any_model(reference_run, tmp_path, caplog, stage,
                                                                          changes, message):
    upstream = ["build_manifest"] + (["contrastive_pretrain"] if stage == "seg_finetune" else [])
    root = project_like(reference_run.root, tmp_path / "project", *upstream)  # built with splits [train, val]
    edit_params(root, **changes)
    before = files(root)

    line = stage_refusal(root, stage, caplog)

    assert line.startswith(message), line
    assert "data/build_manifest/manifest" in line  # names the manifest it measured
    assert "LoRA r=" not in caplog.text  # what building the towers logs: no model was built
    assert files(root) == before
    (run,) = stage_runs(root, stage)
    assert run.info.status == "FAILED" and run.data.tags["error"] == f"ConfigError: {line}"
