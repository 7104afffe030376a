"""Builders: config -> plain numbers -> modules.

`model_spec` freezes everything needed to rebuild a model into a plain dict
(it travels inside every checkpoint, so inference never needs today's
params.yaml); `build_model` turns a spec into a JurasSigLIP with LoRA
adapters on both towers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from jurassiglip import checkpoint
from jurassiglip.config import Params
from jurassiglip.model.fusion import CrossAttention
from jurassiglip.model.head import NoTargetHead, SegHead
from jurassiglip.model.lora import add_lora
from jurassiglip.model.model import JurasSigLIP
from jurassiglip.model.towers import (TextTower, VisionTower, load_pretrained_text, load_pretrained_vision,
                                      tiny_dinov3, tiny_siglip2_text)

log = logging.getLogger(__name__)


def model_spec(params: Params, tokenizer: Any) -> dict[str, Any]:
    """Everything `build_model` needs, as plain JSON-able values."""
    return {
        "preset": params.model.preset,
        "arch": dataclasses.asdict(params.model.arch),
        "image_mean": list(params.model.image_mean),
        "image_std": list(params.model.image_std),
        "lora": dataclasses.asdict(params.lora),
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "logit_scale_init": params.pretrain.logit_scale_init,
        "logit_scale_max": params.pretrain.logit_scale_max,
    }


def build_model(spec: dict[str, Any], *, lora: bool = True) -> JurasSigLIP:
    """A JurasSigLIP from a spec: tiny random towers or pretrained ones, LoRA on both.

    Tiny towers are initialised from torch's current RNG state, so the caller
    seeds first; a checkpoint's state_dict overwrites them anyway.
    """
    arch = spec["arch"]
    if spec["preset"] == "tiny":
        vision_backbone = tiny_dinov3(
            hidden_size=arch["vision_hidden"], num_layers=arch["vision_layers"], num_heads=arch["vision_heads"],
            intermediate_size=arch["vision_mlp"], patch_size=arch["patch_size"], image_size=arch["image_size"],
            num_register_tokens=arch["register_tokens"])
        text_backbone = tiny_siglip2_text(
            vocab_size=spec["vocab_size"], hidden_size=arch["text_hidden"], num_layers=arch["text_layers"],
            num_heads=arch["text_heads"], intermediate_size=arch["text_mlp"],
            max_position_embeddings=arch["text_max_len"], pad_token_id=spec["pad_token_id"],
            bos_token_id=spec["bos_token_id"], eos_token_id=spec["eos_token_id"])
    else:
        vision_backbone = load_pretrained_vision(arch["vision_name"])
        text_backbone = load_pretrained_text(arch["text_name"])
        check_pretrained_fit(vision_backbone.config, text_backbone.config, arch)
    if lora:
        cfg = spec["lora"]
        try:
            vision_backbone, vision_names = add_lora(vision_backbone, cfg["r"], cfg["alpha"], cfg["dropout"],
                                                     cfg["targets"])
            text_backbone, text_names = add_lora(text_backbone, cfg["r"], cfg["alpha"], cfg["dropout"], cfg["targets"])
        except ValueError as err:
            raise ValueError(f"lora.targets = {cfg['targets']!r}: {err}") from None
        log.info("LoRA r=%d alpha=%g on vision %s and text %s", cfg["r"], cfg["alpha"], vision_names, text_names)
    vision = VisionTower(vision_backbone, spec["image_mean"], spec["image_std"])
    text = TextTower(text_backbone, arch["shared_dim"], mask_inside=arch["text_tower_mask"])
    fusion = CrossAttention(dim=arch["shared_dim"], inner_dim=arch["fusion_inner_dim"], heads=arch["fusion_heads"])
    head = SegHead(dim=arch["shared_dim"], hidden=arch["head_hidden"])
    no_target = NoTargetHead(dim=arch["shared_dim"], hidden=arch["head_hidden"])
    return JurasSigLIP(vision, text, fusion, head, no_target, logit_scale_init=spec["logit_scale_init"],
                       logit_scale_max=spec["logit_scale_max"], image_size=arch["image_size"])


def check_pretrained_fit(vision_config: Any, text_config: Any, arch: dict[str, Any]) -> None:
    """The real preset's numbers must agree with the checkpoints it loads."""
    if vision_config.hidden_size != arch["shared_dim"]:
        raise ValueError(f"model.real.shared_dim = {arch['shared_dim']} must equal the hidden size "
                         f"{vision_config.hidden_size} of {arch['vision_name']}")
    if arch["image_size"] % vision_config.patch_size:
        raise ValueError(f"model.real.image_size = {arch['image_size']} is not divisible by the patch size "
                         f"{vision_config.patch_size} of {arch['vision_name']}")
    limit = text_config.max_position_embeddings
    if arch["text_max_len"] > limit:
        raise ValueError(f"model.real.text_max_len = {arch['text_max_len']} exceeds the {limit} positions "
                         f"of {arch['text_name']}")


def hub_offline_unless_pretrained(preset: str) -> None:
    """The default never touches the network; only the real preset may reach the hub."""
    if preset == "tiny":
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"


def model_from_checkpoint(path: str | Path, *, merge: bool = False,
                          map_location: str | torch.device = "cpu") -> tuple[JurasSigLIP, Any, dict[str, Any]]:
    """Rebuild a trained model and its tokenizer from a checkpoint alone (no params.yaml).

    Args:
        merge: fold the LoRA adapters into the base weights (inference).
    Returns:
        (model, tokenizer, spec)
    """
    payload = checkpoint.load(path, map_location)
    spec = payload["spec"]
    hub_offline_unless_pretrained(spec["preset"])
    model = build_model(spec)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise checkpoint.CheckpointError(f"{path}: weights do not fit the model its spec describes: {err}") from None
    if merge:
        model.merge_lora()
    tokenizer = checkpoint.restore_tokenizer(payload["tokenizer"])
    return model, tokenizer, spec
