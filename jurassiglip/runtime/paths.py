"""Where each stage writes: one folder per stage, `data/<stage>/`, and the outputs one stage hands the next.

dvc.yaml declares the same paths as outs; tests/runtime/test_codedeps.py checks
that the two agree, so neither can move without the other. Also where a
training run's resume copy lives, outside every output (training/resume.py).
"""

from __future__ import annotations

from pathlib import Path

STAGES = ("build_manifest", "contrastive_pretrain", "seg_finetune", "evaluate", "render_val")
DATA_DIR = Path("data")

# Outputs one stage hands to the next (the same paths are declared in dvc.yaml).
MANIFEST_DIR = DATA_DIR / "build_manifest" / "manifest"
TOKENIZER_DIR = DATA_DIR / "build_manifest" / "tokenizer"
PRETRAIN_CHECKPOINTS = DATA_DIR / "contrastive_pretrain" / "checkpoints"
FINETUNE_CHECKPOINTS = DATA_DIR / "seg_finetune" / "checkpoints"
FEATURES_DIR = DATA_DIR / "seg_finetune" / "features"
EVALUATE_DIR = DATA_DIR / "evaluate"
GALLERY_DIR = DATA_DIR / "render_val" / "gallery"

# Resume copies of the training stages' checkpoints, under the real repository's root: DVC's own scratch
# folder, git-ignored by .dvc/.gitignore, never an output, never inside an experiment's copy.
RESUME_COPIES = Path(".dvc") / "tmp" / "resume"
# DVC runs `--temp` and queued experiments in copies of the repository under <root>/.dvc/tmp/exps/.
EXPS_MARKER = (".dvc", "tmp", "exps")


def stage_dir(name: str) -> Path:
    """Output folder of a stage, relative to the repository (DVC runs stages there)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    return DATA_DIR / name


def resume_copy_dir(ckpt_dir: str | Path, fingerprint: str) -> Path | None:
    """Where the resume copy of the checkpoints in `ckpt_dir` for run `fingerprint` lives; None outside DVC.

    `<root>/.dvc/tmp/resume/<ckpt_dir relative to its project>/<fingerprint>/`. The project is the
    nearest folder above `ckpt_dir` holding a dvc.yaml: the workspace, or DVC's copy of it for a
    `--temp` or queued experiment. The root is the real repository: for a copy under
    `<root>/.dvc/tmp/exps/` that `<root>`, so every way of running a stage finds the same folder.
    None when the root has no `.dvc` folder (a stage run outside a DVC repository).
    """
    folder = Path(ckpt_dir).resolve()
    project = next((p for p in folder.parents if (p / "dvc.yaml").is_file()), None)
    if project is None:
        return None
    root = project
    parts = project.parts
    for i in range(len(parts) - len(EXPS_MARKER) + 1):
        if parts[i:i + len(EXPS_MARKER)] == EXPS_MARKER:
            root = Path(*parts[:i])
            break
    if not (root / ".dvc").is_dir():
        return None
    return root / RESUME_COPIES / folder.relative_to(project) / fingerprint
