"""Builders: config -> plain numbers -> modules.

`ModelSpec` (spec.py) freezes everything needed to rebuild a model (it
travels inside every checkpoint, so inference never needs today's
params.yaml); `build_model` turns a spec into a JurasSigLIP with LoRA
adapters on both towers; `model_from_checkpoint` rebuilds a trained one from
a checkpoint (see checkpoint.py), its base towers read offline.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from jurassiglip.model import checkpoint
from jurassiglip.config import DecoderConfig, RealPreset, TinyPreset
from jurassiglip.data.tokenizer import load_tokenizer
from jurassiglip.model.decoder import RefineHead
from jurassiglip.model.fusion import CrossAttention
from jurassiglip.model.head import NoTargetHead, SegHead
from jurassiglip.model.lora import add_lora
from jurassiglip.model.model import JurasSigLIP
from jurassiglip.model.spec import PROTOTYPE, ModelSpec
from jurassiglip.model.towers import (TextTower, VisionTower, load_pretrained_text, load_pretrained_vision,
                                      tiny_dinov3, tiny_siglip2_text)

log = logging.getLogger(__name__)


def build_model(spec: ModelSpec, *, lora: bool = True, revisions: dict[str, str | None] | None = None,
                local_files_only: bool = False) -> JurasSigLIP:
    """A JurasSigLIP from a spec: tiny random towers or pretrained ones, LoRA on both.

    Tiny towers are initialised from torch's current RNG state, so the caller
    seeds first; a checkpoint's state_dict overwrites them anyway.

    Args:
        revisions: {"vision": ..., "text": ...} hub revisions of the pretrained towers (None: the default
            branch). The commits they resolve to are kept as `model.base_revisions` (None for a local
            folder), so that a checkpoint names the exact base weights.
        local_files_only: read the pretrained towers from a local folder or the local cache only.
    """
    arch = spec.arch
    if isinstance(arch, TinyPreset):
        vision_backbone = tiny_dinov3(
            hidden_size=arch.vision_hidden, num_layers=arch.vision_layers, num_heads=arch.vision_heads,
            intermediate_size=arch.vision_mlp, patch_size=arch.patch_size, image_size=arch.image_size,
            num_register_tokens=arch.register_tokens)
        text_backbone = tiny_siglip2_text(
            vocab_size=spec.vocab_size, hidden_size=arch.text_hidden, num_layers=arch.text_layers,
            num_heads=arch.text_heads, intermediate_size=arch.text_mlp,
            max_position_embeddings=arch.text_max_len, pad_token_id=spec.pad_token_id,
            bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id)
    else:
        # Pinned to a commit before loading, so the checkpoint can name exactly the weights it was trained on.
        names = {"vision": arch.vision_name, "text": arch.text_name}
        commits = {tower: hub_commit(names[tower], (revisions or {}).get(tower), local_files_only=local_files_only)
                   for tower in ("vision", "text")}
        vision_backbone = load_pretrained_vision(arch.vision_name, revision=commits["vision"],
                                                 local_files_only=local_files_only)
        text_backbone = load_pretrained_text(arch.text_name, revision=commits["text"],
                                             local_files_only=local_files_only)
        check_pretrained_fit(vision_backbone.config, text_backbone.config, arch)
    if lora:
        cfg = spec.lora
        try:
            vision_backbone, vision_names = add_lora(vision_backbone, cfg.r, cfg.alpha, cfg.dropout, cfg.targets)
            text_backbone, text_names = add_lora(text_backbone, cfg.r, cfg.alpha, cfg.dropout, cfg.targets)
        except ValueError as err:
            raise ValueError(f"lora.targets = {cfg.targets!r}: {err}") from None
        log.info("LoRA r=%d alpha=%g on vision %s and text %s", cfg.r, cfg.alpha, vision_names, text_names)
    vision = VisionTower(vision_backbone, list(spec.image_mean), list(spec.image_std))
    text = TextTower(text_backbone, arch.shared_dim, mask_inside=arch.text_tower_mask)
    fusion = CrossAttention(dim=arch.shared_dim, inner_dim=arch.fusion_inner_dim, heads=arch.fusion_heads)
    head = build_decoder(spec.decoder, dim=arch.shared_dim, hidden=arch.head_hidden)
    no_target = NoTargetHead(dim=arch.shared_dim, hidden=arch.head_hidden)
    model = JurasSigLIP(vision, text, fusion, head, no_target, logit_scale_init=spec.logit_scale_init,
                        logit_scale_max=spec.logit_scale_max, image_size=arch.image_size)
    if not spec.embeds_base:
        model.base_revisions = commits  # read by checkpoint.base_sources when the model is saved
    return model


def build_decoder(cfg: DecoderConfig, *, dim: int, hidden: int) -> SegHead | RefineHead:
    """`model.decoder` -> the prototype's SegHead or a RefineHead (decoder.py)."""
    if cfg.kind == "prototype":
        return SegHead(dim=dim, hidden=hidden)
    return RefineHead(dim=dim, hidden=hidden, blocks=cfg.blocks, guide_channels=cfg.guide_channels,
                      guide_to_grid=cfg.guide_to_grid)


def with_decoder(model: JurasSigLIP, spec: ModelSpec, cfg: DecoderConfig) -> ModelSpec:
    """Give `model` the decoder `cfg` describes (a new, untrained one unless it has it already).

    Stage 1 trains no head, so its model carries the prototype's; stage 2
    trains the decoder params.yaml chooses on stage 1's towers. Returns the spec
    of the model as it now is.
    """
    if cfg.kind == "prototype":
        cfg = PROTOTYPE  # the refine knobs mean nothing to it: stage 1's head, weights and all, is kept
    if cfg != spec.decoder:
        device = next(model.parameters()).device
        model.head = build_decoder(cfg, dim=spec.arch.shared_dim, hidden=spec.arch.head_hidden).to(device)
    return dataclasses.replace(spec, decoder=cfg)


def hub_commit(name_or_dir: str, revision: str | None, *, local_files_only: bool) -> str | None:
    """The hub commit `revision` (None: the default branch) of a hub id resolves to; None for a local folder.

    transformers resolves the same way inside `from_pretrained` but no longer
    keeps the commit on the loaded config. Offline, the local cache's refs
    answer; a revision that cannot be resolved is returned as given, and the
    load that follows reports what is missing.
    """
    from transformers.utils.hub import resolve_revision

    resolved = resolve_revision(name_or_dir, revision, local_files_only=local_files_only)
    return getattr(resolved, "resolved", None) or revision


def check_pretrained_fit(vision_config: Any, text_config: Any, arch: RealPreset) -> None:
    """The real preset's numbers must agree with the checkpoints it loads."""
    if vision_config.hidden_size != arch.shared_dim:
        raise ValueError(f"model.real.shared_dim = {arch.shared_dim} must equal the hidden size "
                         f"{vision_config.hidden_size} of {arch.vision_name}")
    if arch.image_size % vision_config.patch_size:
        raise ValueError(f"model.real.image_size = {arch.image_size} is not divisible by the patch size "
                         f"{vision_config.patch_size} of {arch.vision_name}")
    limit = text_config.max_position_embeddings
    if arch.text_max_len > limit:
        raise ValueError(f"model.real.text_max_len = {arch.text_max_len} exceeds the {limit} positions "
                         f"of {arch.text_name}")


def hub_offline_unless_pretrained(preset: str) -> None:
    """The default never touches the network; only the real preset may reach the hub."""
    if preset == "tiny":
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"


def checkpoint_loads_offline() -> bool:
    """Loading a checkpoint reads its base towers from disk only, unless the user set HF_HUB_OFFLINE=0.

    A checkpoint is used where it is deployed (an offline GPU node, a CI
    runner): a missing base should fail at once with a message saying how to
    get it, not after the hub client's retries. Training stages given a hub id
    still download (the user's choice); only this path defaults to offline.
    """
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() not in ("0", "false", "no", "off")


def model_from_checkpoint(path: str | Path, *, merge: bool = False,
                          map_location: str | torch.device = "cpu") -> tuple[JurasSigLIP, Any, ModelSpec]:
    """Rebuild a trained model and its tokenizer from a checkpoint alone (no params.yaml).

    The tiny preset's checkpoint holds everything. The real preset's holds the
    trained weights and the base towers' names and revisions: the towers are
    read from their local folder or the local Hugging Face cache, offline
    (see `checkpoint_loads_offline`); a missing one is a CheckpointError that
    says how to download it.

    Args:
        merge: fold the LoRA adapters into the base weights (inference).
    Returns:
        (model, tokenizer, spec)
    """
    return model_from_payload(path, checkpoint.load(path, map_location), merge=merge)


def model_from_payload(path: str | Path, payload: dict[str, Any], *,
                       merge: bool = False) -> tuple[JurasSigLIP, Any, ModelSpec]:
    """`model_from_checkpoint` for a payload already read from `path` (named in every error)."""
    spec, base = payload["spec"], payload["base"]
    hub_offline_unless_pretrained(spec.preset)
    offline = checkpoint_loads_offline()
    try:
        model = build_model(spec, revisions=None if base["embedded"] else
                            {tower: base[tower]["revision"] for tower in ("vision", "text")},
                            local_files_only=offline)
    except OSError as err:  # what transformers raises for a base missing from the folder or the cache
        raise checkpoint.CheckpointError(_missing_base(path, base, offline, err)) from None
    except ValueError as err:
        raise checkpoint.CheckpointError(f"{path}: {err}") from None
    checkpoint.load_weights(path, model, payload)
    if merge:
        model.merge_lora()
    tokenizer = checkpoint.embedded_tokenizer(payload["tokenizer"])
    if tokenizer is None:
        reference = payload["tokenizer"]
        try:
            tokenizer = load_tokenizer(reference["name"], revision=reference["revision"], local_files_only=offline)
        except OSError as err:
            raise checkpoint.CheckpointError(_missing_base(path, {"text": reference}, offline, err)) from None
    return model, tokenizer, spec


def _missing_base(path: str | Path, base: dict[str, Any], offline: bool, err: Exception) -> str:
    """One message: the base checkpoints the file needs, and how to get them."""
    needs, fixes = [], []
    for tower in ("vision", "text"):
        if tower not in base:
            continue
        name, revision = base[tower]["name"], base[tower]["revision"]
        if revision:
            needs.append(f"{name} at revision {revision}")
            fixes.append(f"`hf download {name} --revision {revision}`")
        else:  # a local folder when trained (no hub commit)
            needs.append(f"{name} (a local folder when trained)")
            fixes.append(f"put that folder back (or `hf download {name} --local-dir {name}` for a hub copy)")
    where = "in a local folder or the local Hugging Face cache" if offline else "anywhere it could look"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"{path}: needs the base checkpoints {' and '.join(needs)}, and one is not {where} ({reason}). "
            f"Get them: {'; '.join(fixes)} (DINOv3 is gated: accept its licence on huggingface.co and run "
            f"`hf auth login` first); or set HF_HUB_OFFLINE=0 to let loading download them")
