"""Fixtures of the hand-made evaluation data (handmade.py)."""

from __future__ import annotations

import pytest
from handmade import ScriptedPredictor, hand_manifest

from jurassiglip.data.manifest import Manifest


@pytest.fixture
def hand_made_manifest() -> Manifest:
    return hand_manifest()


@pytest.fixture
def scripted_predictor() -> ScriptedPredictor:
    return ScriptedPredictor()
