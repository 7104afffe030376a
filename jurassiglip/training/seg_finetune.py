"""Stage 2, segmentation finetuning: train cross-attention + head on frozen towers.

Loss = dice_weight x Dice + focal_weight x Focal(alpha, gamma) on the
per-caption target mask (no-target captions keep their empty target)
+ no_target_weight x BCE of the no-target head. With
`cache_features` the towers run once per image / caption before training
(features.py) and every epoch reads fp16 features from disk; without it
they run live on every step, which gives the same loss to fp16 precision.
`segmentation_objective` builds the `SegmentationObjective` that
`loop.fit` trains.

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
from torch.utils.data import Dataset

from jurassiglip.runtime import distributed
from jurassiglip.config import FinetuneConfig
from jurassiglip.data.datasets import CaptionDataset, EpochSampler
from jurassiglip.data.manifest import Manifest
from jurassiglip.training.features import CachedSegDataset, build_cache
from jurassiglip.training.losses import no_target_loss, segmentation_loss
from jurassiglip.model.model import JurasSigLIP
from jurassiglip.training.loop import Batch, EpochBatches, Objective, check_split_sizes
from jurassiglip.model.spec import ModelSpec


def split_ids(manifest: Manifest, split: str) -> np.ndarray:
    return manifest.samples.loc[manifest.samples["split"] == split, "sample_id"].to_numpy()


def check_splits(manifest: Manifest, cfg: FinetuneConfig, train_split: str, val_split: str) -> None:
    """Refuse missing or empty splits and a batch larger than the training split, before any model is built.

    An epoch draws every caption of the split (`split_ids`), no-target ones included.
    """
    sizes = {split: len(split_ids(manifest, split)) for split in (train_split, val_split)}
    check_split_sizes(manifest.root, set(manifest.samples["split"]), sizes, "captions", train_split=train_split,
                      val_split=val_split, batch_key="finetune.batch_size", batch_size=cfg.batch_size,
                      world_size=distributed.world_size())


Decode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def stage2_loss(decode: Decode, cfg: FinetuneConfig, patches: torch.Tensor, tokens: torch.Tensor,
                text_mask: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mask loss + weighted no-target loss of one batch of features (B, N, D), (B, L, D), (B, L)
    and its images (batch["image"], read by a decoder with an image guide)."""
    dev = patches.device
    logits, nt_logits = decode(patches, tokens, text_mask, batch["image"].to(dev))  # (B, 1, S, S), (B,)
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


class SegmentationObjective(Objective):
    """Stage 2 for `loop.fit`: the mask and no-target loss of fusion + heads on the frozen towers.

    Args:
        model: the model; fusion, segmentation head and (with a no-target weight) the no-target
            head are made trainable here, before DDP wraps its decoder.
        batches: feature-cache batches (a `CachedSegDataset`: only fusion + heads run) or
            image-and-caption batches (a `CaptionDataset`: the towers run too, without grad).
        cfg: the finetune section (the loss weights).
        spec, tokenizer: what the checkpoint carries to rebuild the model (model/build.py).
    """

    STAGE = "seg_finetune"  # the checkpoint's stage (checkpoint.STAGES)

    def __init__(self, model: JurasSigLIP, batches: EpochBatches, *, cfg: FinetuneConfig, spec: ModelSpec,
                 tokenizer: Any):
        self.model = model
        self.batches = batches
        self.spec, self.tokenizer = spec, tokenizer
        self.no_target = cfg.no_target_weight > 0
        self._trainable = model.trainable_for_finetune(with_no_target=self.no_target)
        decode = distributed.data_parallel(model, JurasSigLIP.decode)
        loss_fn = cached_loss_fn if isinstance(batches.dataset, CachedSegDataset) else live_loss_fn
        self._loss = loss_fn(model, cfg, decode)

    def trainable(self) -> list[torch.nn.Parameter]:
        return self._trainable

    def loss(self, batch: Batch) -> torch.Tensor:
        return self._loss(batch)

    def train_mode(self) -> None:
        train_head_only(self.model)

    def checkpoint_payload(self) -> dict[str, Any]:
        return {"spec": self.spec, "model": self.model, "tokenizer": self.tokenizer, "stage": self.STAGE,
                "heads": {"segmentation": True, "no_target": self.no_target}}


def segmentation_objective(model: JurasSigLIP, manifest: Manifest, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor, *, cfg: FinetuneConfig, train_split: str, val_split: str,
                           seed: int, features_dir: Path, cache_fingerprint: str, spec: ModelSpec,
                           tokenizer: Any) -> SegmentationObjective:
    """Stage 2 on `train_split`, validated on `val_split` (this rank's share), on cached or live features.

    With `cfg.cache_features` the feature cache of both splits is built (or
    found up to date) in `features_dir` first: a collective under torchrun.

    Args:
        input_ids, attention_mask: (n_samples, L) tokens of every manifest row.
        cache_fingerprint: what the cache must have been built from to be reused.
        spec, tokenizer: what the checkpoint carries to rebuild the model.
    """
    rank, world = distributed.rank(), distributed.world_size()
    train_ids, val_ids = split_ids(manifest, train_split), split_ids(manifest, val_split)
    dataset: Dataset
    if cfg.cache_features:
        # a collective: every rank encodes its share (or all find it up to date)
        cache = build_cache(model, manifest, input_ids, attention_mask, np.concatenate([train_ids, val_ids]),
                            features_dir, batch_size=cfg.batch_size, fingerprint=cache_fingerprint)
        dataset = CachedSegDataset(manifest, cache)
    else:
        dataset = CaptionDataset(manifest, input_ids, attention_mask, with_target=True)
    batches = EpochBatches(dataset, EpochSampler(train_ids, None, seed=seed, rank=rank, world_size=world),
                           EpochSampler(val_ids, None, seed=seed, shuffle=False, rank=rank, world_size=world),
                           batch_size=cfg.per_rank_batch(world), num_workers=cfg.num_workers)
    return SegmentationObjective(model, batches, cfg=cfg, spec=spec, tokenizer=tokenizer)


def train_head_only(model: JurasSigLIP) -> None:
    """Training mode for fusion + head; the frozen towers stay in eval mode.

    DINOv3 jitters its RoPE coordinates in training mode, so frozen towers in
    train mode would not reproduce the cached (eval-mode) features.
    """
    model.train()
    model.vision.eval()
    model.text.eval()
