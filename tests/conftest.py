"""Shared fixtures: the repository's params as a dict, and a micro config for end-to-end runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture
def params_dict() -> dict:
    """A fresh copy of the repository's params.yaml, parsed."""
    return repo_params()


@pytest.fixture(scope="session")
def micro_params() -> dict:
    """params.yaml shrunk to a handful of images and one epoch per stage (seconds, not minutes)."""
    p = repo_params()
    p["synthetic"]["n_images"] = {"train": 24, "val": 8, "test": 6}
    p["synthetic"]["max_side"] = 128
    p["model"]["tiny"].update(image_size=32, patch_size=8, vision_layers=1, text_layers=1, vision_hidden=32,
                              shared_dim=32, text_hidden=32, vision_mlp=64, text_mlp=64, fusion_inner_dim=32,
                              head_hidden=32, text_max_len=12)
    p["pretrain"].update(epochs=1, batch_size=8, log_every=1)
    p["finetune"].update(epochs=1, batch_size=16, log_every=1)
    p["evaluate"]["batch_size"] = 16
    p["render"].update(n_images=2, max_captions=3)
    return p


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory, micro_params):
    """A micro synthetic set built into a manifest + tokenizer, as build_manifest does (shared, read-only)."""
    from jurassiglip.config import params_from_dict
    from jurassiglip.data.build_manifest import build_inputs

    root = tmp_path_factory.mktemp("micro_data")
    build_inputs(params_from_dict(micro_params), root)
    return root
