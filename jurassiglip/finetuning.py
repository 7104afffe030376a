"""Stage 2, segmentation finetuning: train cross-attention + head on frozen towers.

Loss = dice_weight x Dice + focal_weight x Focal(alpha, gamma) on the
per-caption target mask (no-target captions keep their empty target). With
`cache_features` the towers run once per image / caption before training
(features.py) and every epoch reads fp16 features from disk; without it
they run live on every step, which gives the same loss to fp16 precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from jurassiglip.config import FinetuneConfig
from jurassiglip.data.datasets import CaptionDataset, EpochSampler
from jurassiglip.data.manifest import Manifest
from jurassiglip.features import CachedSegDataset, build_cache
from jurassiglip.losses import segmentation_loss
from jurassiglip.model.model import JurasSigLIP
from jurassiglip.train import FitResult, LoopSettings, fit


def split_ids(manifest: Manifest, split: str) -> np.ndarray:
    return manifest.samples.loc[manifest.samples["split"] == split, "sample_id"].to_numpy()


def cached_loss_fn(model: JurasSigLIP, cfg: FinetuneConfig):
    """Loss of a batch from the feature cache: only fusion + head run."""
    dev = next(model.parameters()).device

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model.segment(batch["patches"].to(dev), batch["text"].to(dev), batch["text_mask"].to(dev))
        return segmentation_loss(logits, batch["target"].to(dev), dice_weight=cfg.dice_weight,
                                 focal_weight=cfg.focal_weight, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)

    return loss_fn


def live_loss_fn(model: JurasSigLIP, cfg: FinetuneConfig):
    """Loss of a batch of images and captions: frozen towers run without grad, then fusion + head."""
    dev = next(model.parameters()).device

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            patches, _ = model.encode_image(batch["image"].to(dev))  # (B, N, D)
            tokens, mask, _ = model.encode_text(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
        logits = model.segment(patches, tokens, mask)  # (B, 1, S, S)
        return segmentation_loss(logits, batch["target"].to(dev), dice_weight=cfg.dice_weight,
                                 focal_weight=cfg.focal_weight, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)

    return loss_fn


def train_segmentation(model: JurasSigLIP, manifest: Manifest, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, *, cfg: FinetuneConfig, train_split: str, val_split: str,
                       seed: int, ckpt_dir: Path, features_dir: Path, cache_fingerprint: str, best_payload: Any,
                       run_fingerprint: str, tracker: Any) -> FitResult:
    """Fit stage 2 on `train_split`, early-stopping on `val_split` loss."""
    train_ids, val_ids = split_ids(manifest, train_split), split_ids(manifest, val_split)
    trainable = model.trainable_for_finetune()
    dataset: Dataset
    if cfg.cache_features:
        cache = build_cache(model, manifest, input_ids, attention_mask, np.concatenate([train_ids, val_ids]),
                            features_dir, batch_size=cfg.batch_size, fingerprint=cache_fingerprint)
        dataset, loss_fn = CachedSegDataset(manifest, cache), cached_loss_fn(model, cfg)
    else:
        dataset = CaptionDataset(manifest, input_ids, attention_mask, with_target=True)
        loss_fn = live_loss_fn(model, cfg)
    train_sampler = EpochSampler(train_ids, None, seed=seed)
    val_sampler = EpochSampler(val_ids, None, seed=seed, shuffle=False)

    def train_batches(epoch: int) -> DataLoader:
        train_sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size=cfg.batch_size, sampler=train_sampler, num_workers=cfg.num_workers)

    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return fit(
        model=model, optimizer=optimizer, loss_fn=loss_fn, train_batches=train_batches,
        val_batches=lambda: DataLoader(dataset, batch_size=cfg.batch_size, sampler=val_sampler,
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
