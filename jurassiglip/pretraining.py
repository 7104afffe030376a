"""Stage 1, contrastive pretraining: align the CLS token with the global text feature.

Trainable: the LoRA adapters of both towers, the text down projection and
the logit scale. Only captions that name something in their image are used
(a no-target caption is not a description of its image). Each epoch takes
one caption per image, so no batch treats two captions of one image as
negatives of each other; the loss also counts same-image pairs as positives
should a sampler ever put two in one batch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from jurassiglip.config import PretrainConfig
from jurassiglip.data.datasets import CaptionDataset, EpochSampler
from jurassiglip.data.manifest import Manifest
from jurassiglip.losses import clip_loss, sigmoid_loss
from jurassiglip.model.model import JurasSigLIP
from jurassiglip.train import FitResult, LoopSettings, fit


def contrastive_samples(manifest: Manifest, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Sample ids and image indices of the targeted captions of `split`."""
    rows = manifest.samples[(manifest.samples["split"] == split) & ~manifest.samples["no_target"]]
    return rows["sample_id"].to_numpy(), rows["image_index"].to_numpy()


def train_contrastive(model: JurasSigLIP, manifest: Manifest, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, *, cfg: PretrainConfig, train_split: str, val_split: str,
                      seed: int, ckpt_dir: Path, best_payload: Any, run_fingerprint: str, tracker: Any) -> FitResult:
    """Fit stage 1 on `train_split`, early-stopping on `val_split` loss."""
    dev = next(model.parameters()).device
    dataset = CaptionDataset(manifest, input_ids, attention_mask, with_target=False)
    train_ids, train_images = contrastive_samples(manifest, train_split)
    val_ids, val_images = contrastive_samples(manifest, val_split)
    train_sampler = EpochSampler(train_ids, train_images, seed=seed, one_per_image=True)
    # Validation: a fixed caption per image (epoch 0 of a fixed seed), fixed order.
    val_sampler = EpochSampler(val_ids, val_images, seed=seed, one_per_image=True, shuffle=False)

    def loader(sampler: EpochSampler, drop_last: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=cfg.num_workers)

    def train_batches(epoch: int) -> DataLoader:
        train_sampler.set_epoch(epoch)
        return loader(train_sampler, drop_last=True)

    sigmoid = cfg.loss == "sigmoid"

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        image_emb, text_emb = model.contrastive_features(batch["image"].to(dev), batch["input_ids"].to(dev),
                                                         batch["attention_mask"].to(dev))  # (B, D), (B, D)
        image_ids = batch["image_index"].to(dev)
        if sigmoid:
            return sigmoid_loss(image_emb, text_emb, model.logit_scale, model.logit_bias, image_ids)
        return clip_loss(image_emb, text_emb, model.logit_scale, image_ids)

    trainable = model.trainable_for_pretrain(with_logit_bias=sigmoid)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return fit(
        model=model, optimizer=optimizer, loss_fn=loss_fn, train_batches=train_batches,
        val_batches=lambda: loader(val_sampler, drop_last=False),
        settings=LoopSettings(cfg.epochs, cfg.patience, cfg.log_every, cfg.max_val_batches, cfg.lr_schedule),
        ckpt_dir=ckpt_dir, best_payload=best_payload, run_fingerprint=run_fingerprint, tracker=tracker,
        epoch_extras=lambda: {"logit_scale": math.exp(float(model.logit_scale.detach()))},
        after_step=model.clamp_logit_scale_,
    )
