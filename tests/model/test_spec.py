"""The model spec: made from params, stored as JSON in a checkpoint, read back to the same value."""

from __future__ import annotations

import json

from jurassiglip.config import LoraConfig, TinyPreset, params_from_dict
from jurassiglip.data.tokenizer import load_tokenizer
from jurassiglip.model.spec import ModelSpec


def test_from_params_takes_the_active_preset_and_the_tokenizer_ids(micro_params, micro_data):
    params = params_from_dict(micro_params)
    tokenizer = load_tokenizer(micro_data / "tokenizer")
    spec = ModelSpec.from_params(params, tokenizer)
    assert spec.preset == "tiny" and isinstance(spec.arch, TinyPreset)
    assert spec.arch.image_size == micro_params["model"]["tiny"]["image_size"]
    assert spec.lora == LoraConfig(**micro_params["lora"])
    assert spec.vocab_size == len(tokenizer)
    assert (spec.pad_token_id, spec.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert spec.embeds_base  # tiny towers exist nowhere else


def test_json_round_trip_gives_the_same_spec(micro_params, micro_data):
    spec = ModelSpec.from_params(params_from_dict(micro_params), load_tokenizer(micro_data / "tokenizer"))
    stored = json.loads(json.dumps(spec.to_dict()))  # what a checkpoint's metadata gives back
    assert stored["arch"] == micro_params["model"]["tiny"]
    assert stored["image_mean"] == micro_params["model"]["image_mean"]
    assert ModelSpec.from_dict(stored) == spec
