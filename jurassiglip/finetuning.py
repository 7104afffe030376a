"""Stage 2, segmentation finetuning: train cross-attention + head on frozen towers.

Loss = dice_weight x Dice + focal_weight x Focal(alpha, gamma) on the
per-caption target mask (no-target captions keep their empty target)
+ no_target_weight x BCE of the no-target head. With
`cache_features` the towers run once per image / caption before training
(features.py) and every epoch reads fp16 features from disk; without it
they run live on every step, which gives the same loss to fp16 precision.

Under torchrun each rank trains on its share of the global batch through a
DDP wrapper of `JurasSigLIP.decode`; the ranks build the feature cache
together, each encoding its share of the images and captions, then they
all read the whole of it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from jurassiglip import distributed
from jurassiglip.config import FinetuneConfig
from jurassiglip.data.datasets import CaptionDataset, EpochSampler, batch_loader
from jurassiglip.data.manifest import Manifest
from jurassiglip.features import CachedSegDataset, build_cache
from jurassiglip.losses import no_target_loss, segmentation_loss
from jurassiglip.model.model import JurasSigLIP
from jurassiglip.train import FitResult, LoopSettings, fit


def split_ids(manifest: Manifest, split: str) -> np.ndarray:
    return manifest.samples.loc[manifest.samples["split"] == split, "sample_id"].to_numpy()


Decode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def stage2_loss(decode: Decode, cfg: FinetuneConfig, patches: torch.Tensor, tokens: torch.Tensor,
                text_mask: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mask loss + weighted no-target loss of one batch of features (B, N, D), (B, L, D), (B, L)."""
    dev = patches.device
    logits, nt_logits = decode(patches, tokens, text_mask)  # (B, 1, S, S), (B,)
    loss = segmentation_loss(logits, batch["target"].to(dev), dice_weight=cfg.dice_weight,
                             focal_weight=cfg.focal_weight, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)
    if cfg.no_target_weight:
        loss = loss + cfg.no_target_weight * no_target_loss(nt_logits, batch["no_target"].to(dev))
    return loss


def cached_loss_fn(model: JurasSigLIP, cfg: FinetuneConfig, decode: Decode | None = None):
    """Loss of a batch from the feature cache: only fusion + heads run.

    Args:
        decode: what trains, `model.decode` (default) or its DDP wrapper.
    """
    dev = next(model.parameters()).device
    decode = decode or model.decode

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return stage2_loss(decode, cfg, batch["patches"].to(dev), batch["text"].to(dev),
                           batch["text_mask"].to(dev), batch)

    return loss_fn


def live_loss_fn(model: JurasSigLIP, cfg: FinetuneConfig, decode: Decode | None = None):
    """Loss of a batch of images and captions: frozen towers run without grad, then fusion + heads.

    Args:
        decode: what trains, `model.decode` (default) or its DDP wrapper.
    """
    dev = next(model.parameters()).device
    decode = decode or model.decode

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            patches, _ = model.encode_image(batch["image"].to(dev))  # (B, N, D)
            tokens, mask, _ = model.encode_text(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
        return stage2_loss(decode, cfg, patches, tokens, mask, batch)

    return loss_fn


def train_segmentation(model: JurasSigLIP, manifest: Manifest, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, *, cfg: FinetuneConfig, train_split: str, val_split: str,
                       seed: int, ckpt_dir: Path, features_dir: Path, cache_fingerprint: str, best_payload: Any,
                       run_fingerprint: str, tracker: Any) -> FitResult:
    """Fit stage 2 on `train_split`, early-stopping on `val_split` loss (on this rank's share under torchrun)."""
    rank, world = distributed.rank(), distributed.world_size()
    batch_size = cfg.per_rank_batch(world)
    train_ids, val_ids = split_ids(manifest, train_split), split_ids(manifest, val_split)
    trainable = model.trainable_for_finetune(with_no_target=cfg.no_target_weight > 0)
    decode = distributed.data_parallel(model, JurasSigLIP.decode)
    dataset: Dataset
    if cfg.cache_features:
        # a collective: every rank encodes its share (or all find it up to date)
        cache = build_cache(model, manifest, input_ids, attention_mask, np.concatenate([train_ids, val_ids]),
                            features_dir, batch_size=cfg.batch_size, fingerprint=cache_fingerprint)
        dataset, loss_fn = CachedSegDataset(manifest, cache), cached_loss_fn(model, cfg, decode)
    else:
        dataset = CaptionDataset(manifest, input_ids, attention_mask, with_target=True)
        loss_fn = live_loss_fn(model, cfg, decode)
    train_sampler = EpochSampler(train_ids, None, seed=seed, rank=rank, world_size=world)
    val_sampler = EpochSampler(val_ids, None, seed=seed, shuffle=False, rank=rank, world_size=world)

    def train_batches(epoch: int) -> DataLoader:
        train_sampler.set_epoch(epoch)
        return batch_loader(dataset, sampler=train_sampler, batch_size=batch_size, num_workers=cfg.num_workers)

    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return fit(
        model=model, optimizer=optimizer, loss_fn=loss_fn, train_batches=train_batches,
        val_batches=lambda: batch_loader(dataset, sampler=val_sampler, batch_size=batch_size,
                                         num_workers=cfg.num_workers),
        settings=LoopSettings(cfg.epochs, cfg.patience, cfg.log_every, cfg.max_val_batches, cfg.lr_schedule),
        ckpt_dir=ckpt_dir, best_payload=best_payload, run_fingerprint=run_fingerprint, tracker=tracker,
        train_mode=lambda: train_head_only(model),
    )


def train_head_only(model: JurasSigLIP) -> None:
    """Training mode for fusion + head; the frozen towers stay in eval mode.

    DINOv3 jitters its RoPE coordinates in training mode, so frozen towers in
    train mode would not reproduce the cached (eval-mode) features.
    """
    model.train()
    model.vision.eval()
    model.text.eval()
