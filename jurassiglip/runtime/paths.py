"""Where each stage writes: one folder per stage, `data/<stage>/`, and the outputs one stage hands the next.

dvc.yaml declares the same paths as outs; tests/runtime/test_codedeps.py checks
that the two agree, so neither can move without the other.
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


def stage_dir(name: str) -> Path:
    """Output folder of a stage, relative to the repository (DVC runs stages there)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    return DATA_DIR / name
