"""Stage 1, contrastive pretraining: align the CLS token with the global text feature.

Trainable: the LoRA adapters of both towers, the text down projection and
the logit scale. Only captions that name something in their image are used
(a no-target caption is not a description of its image). Each epoch takes
one caption per image, so no batch treats two captions of one image as
negatives of each other; the loss also counts same-image pairs as positives
should a sampler ever put two in one batch. `contrastive_objective` builds
all of that into the `ContrastiveObjective` that `loop.fit` trains.

Under torchrun every rank embeds its share of the global batch and the loss
is computed over the features of all ranks (gathered with their gradients),
so the negatives are those of the whole global batch, as in one process.

With `pretrain.micro_batch_size` the step is a gradient cache (Gao et al.
2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"): the batch is embedded in micro-batches without a graph, the loss
and its gradient with respect to every feature are computed on those
detached features, and each micro-batch is then run again with a graph and
backpropagated from its features' gradients. Activation memory is that of
one micro-batch; the gradient is that of the whole batch.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jurassiglip.runtime import distributed
from jurassiglip.config import PretrainConfig
from jurassiglip.data.datasets import CaptionDataset, EpochSampler
from jurassiglip.data.manifest import Manifest
from jurassiglip.runtime.env import autocast
from jurassiglip.training.losses import clip_loss, sigmoid_loss
from jurassiglip.model.model import JurasSigLIP
from jurassiglip.training.loop import Batch, EpochBatches, Objective, backward_step, check_split_sizes
from jurassiglip.model.spec import ModelSpec


def contrastive_samples(manifest: Manifest, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Sample ids and image indices of the targeted captions of `split`."""
    rows = manifest.samples[(manifest.samples["split"] == split) & ~manifest.samples["no_target"]]
    return rows["sample_id"].to_numpy(), rows["image_index"].to_numpy()


def check_splits(manifest: Manifest, cfg: PretrainConfig, train_split: str, val_split: str) -> None:
    """Refuse missing or empty splits and a batch larger than the training split, before any model is built.

    An epoch draws one targeted caption per image (see `contrastive_samples`).
    """
    sizes = {split: len(np.unique(contrastive_samples(manifest, split)[1])) for split in (train_split, val_split)}
    check_split_sizes(manifest.root, set(manifest.samples["split"]), sizes, "images with a targeted caption",
                      train_split=train_split, val_split=val_split, batch_key="pretrain.batch_size",
                      batch_size=cfg.batch_size, world_size=distributed.world_size())


def contrastive_outputs(model: JurasSigLIP, images: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Everything the stage-1 loss reads, as one forward (what DDP wraps).

    Returns:
        image_emb (B, D), text_emb (B, D), logit_scale (), logit_bias ().
    """
    image_emb, text_emb = model.contrastive_features(images, input_ids, attention_mask)  # (B, D), (B, D)
    return image_emb, text_emb, model.logit_scale, model.logit_bias


class ContrastiveObjective(Objective):
    """Stage 1 for `loop.fit`: the contrastive loss of caption batches and its (gradient-cache) step.

    Args:
        model: the model; its stage-1 parameters are made trainable here, before DDP wraps it.
        batches: the targeted captions of both splits, on this rank's share (`contrastive_objective`).
        loss: "clip" or "sigmoid" (pretrain.loss); the sigmoid loss also trains the logit bias.
        micro_batch: samples per forward pass with a graph; below the rank's batch size
            the step is a gradient cache, at or above it a plain forward and backward.
        spec, tokenizer: what the checkpoint carries to rebuild the model (model/build.py).
    """

    STAGE = "contrastive_pretrain"  # the checkpoint's stage (checkpoint.STAGES)

    def __init__(self, model: JurasSigLIP, batches: EpochBatches, *, loss: str, micro_batch: int,
                 spec: ModelSpec, tokenizer: Any):
        self.model = model
        self.batches = batches
        self.sigmoid = loss == "sigmoid"
        self.micro_batch = micro_batch
        self.spec, self.tokenizer = spec, tokenizer
        self.dev = next(model.parameters()).device
        self._trainable = model.trainable_for_pretrain(with_logit_bias=self.sigmoid)
        self.forward = distributed.data_parallel(model, contrastive_outputs)

    def trainable(self) -> list[torch.nn.Parameter]:
        return self._trainable

    def after_step(self) -> None:
        self.model.clamp_logit_scale_()

    def epoch_extras(self) -> dict[str, float]:
        return {"logit_scale": math.exp(float(self.model.logit_scale.detach()))}

    def checkpoint_payload(self) -> dict[str, Any]:
        return {"spec": self.spec, "model": self.model, "tokenizer": self.tokenizer, "stage": self.STAGE,
                "heads": {"segmentation": False, "no_target": False}}

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return tuple(batch[k].to(self.dev) for k in ("image", "input_ids", "attention_mask", "image_index"))

    def pair_loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                  logit_bias: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        """The configured loss over (B, D) embeddings of one (global) batch."""
        if self.sigmoid:
            return sigmoid_loss(image_emb, text_emb, logit_scale, logit_bias, image_ids)
        return clip_loss(image_emb, text_emb, logit_scale, image_ids)

    def loss(self, batch: Batch) -> torch.Tensor:
        """Loss over the global batch: this rank's features meet the negatives of every rank."""
        images, input_ids, attention_mask, image_ids = self._inputs(batch)
        image_emb, text_emb, scale, bias = self.forward(images, input_ids, attention_mask)  # (b, D) x 2
        return self.pair_loss(distributed.gather_with_grad(image_emb), distributed.gather_with_grad(text_emb),
                              scale, bias, distributed.all_gather(image_ids))  # over (B, D) = all ranks

    def step(self, batch: Batch) -> torch.Tensor:
        """One training step's loss, detached, and gradients: the gradient cache or the plain step."""
        if self.micro_batch >= len(batch["sample_id"]):
            return backward_step(self.loss, batch, self.dev)
        return self._grad_cache_step(batch)

    def _grad_cache_step(self, batch: Batch) -> torch.Tensor:
        images, input_ids, attention_mask, image_ids = self._inputs(batch)
        parts = [slice(i, i + self.micro_batch) for i in range(0, len(images), self.micro_batch)]
        # Every forward of the step starts from the same RNG state (see RngState).
        start = RngState.capture(self.dev)

        # 1. Embed every micro-batch without a graph.
        embedded = []
        with torch.no_grad(), autocast(self.dev):
            for i, part in enumerate(parts):
                start.restore()
                embedded.append(self.model.contrastive_features(images[part], input_ids[part], attention_mask[part]))
                if i == 0:
                    after_one_forward = RngState.capture(self.dev)
        image_emb = torch.cat([e[0] for e in embedded])  # (b, D)
        text_emb = torch.cat([e[1] for e in embedded])  # (b, D)

        # 2. The loss over the global batch on detached features: d loss / d each of its inputs.
        leaves = [distributed.all_gather(image_emb), distributed.all_gather(text_emb),  # (B, D) x 2
                  self.model.logit_scale.detach(), self.model.logit_bias.detach()]
        leaves = [leaf.detach().float().requires_grad_() for leaf in leaves]
        with autocast(self.dev):
            loss = self.pair_loss(*leaves, distributed.all_gather(image_ids))
        if not torch.isfinite(loss):
            after_one_forward.restore()
            return loss.detach()
        grad_image, grad_text, grad_scale, grad_bias = torch.autograd.grad(loss, leaves, allow_unused=True)
        # This rank's rows. Every rank computed the same global loss and DDP averages the parameter
        # gradients over ranks: scaling the feature gradients by world_size makes that average the
        # single-process gradient (the scale and bias gradients are whole on every rank already).
        rows = slice(distributed.rank() * len(images), (distributed.rank() + 1) * len(images))
        grad_image = grad_image[rows] * distributed.world_size()  # (b, D)
        grad_text = grad_text[rows] * distributed.world_size()  # (b, D)

        # 3. Each micro-batch again, with a graph, backpropagated from its features' gradients.
        #    Ranks sync their gradients once, in the last backward.
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            with nullcontext() if last else distributed.no_sync(self.forward):
                start.restore()
                with autocast(self.dev):
                    image_part, text_part, scale, bias = self.forward(images[part], input_ids[part],
                                                                      attention_mask[part])  # (m, D) x 2
                surrogate = ((image_part.float() * grad_image[part]).sum()
                             + (text_part.float() * grad_text[part]).sum())
                if last:  # the loss's own parameters, once per step
                    surrogate = surrogate + scale * grad_scale
                    if grad_bias is not None:  # the clip loss has no bias
                        surrogate = surrogate + bias * grad_bias
                surrogate.backward()
        after_one_forward.restore()
        return loss.detach()


@dataclass(frozen=True)
class RngState:
    """Torch's RNG state (CPU, and the GPU's when on CUDA), to be restored at will.

    A gradient-cache step starts every forward pass, with and without a
    graph, from the state the step started with. DINOv3 in train mode draws
    its RoPE coordinate shift/jitter/rescale once per forward, so every
    micro-batch then sees the same draw, as the whole batch does in one
    pass: the graph pass recomputes exactly the features the loss saw, and
    the step equals the full-batch step. Afterwards the RNG continues from
    where one forward pass leaves it, as after a full-batch step. (Draws per
    sample, such as LoRA dropout, repeat from micro-batch to micro-batch; each
    sample still gets a random mask.)
    """

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    dev: torch.device

    @classmethod
    def capture(cls, dev: torch.device) -> RngState:
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None, dev)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.dev)


def contrastive_objective(model: JurasSigLIP, manifest: Manifest, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, *, cfg: PretrainConfig, train_split: str, val_split: str,
                          seed: int, spec: ModelSpec, tokenizer: Any) -> ContrastiveObjective:
    """Stage 1 on the targeted captions of `train_split`, validated on `val_split` (this rank's share).

    Args:
        input_ids, attention_mask: (n_samples, L) tokens of every manifest row.
        spec, tokenizer: what the checkpoint carries to rebuild the model.
    """
    rank, world = distributed.rank(), distributed.world_size()
    train_ids, train_images = contrastive_samples(manifest, train_split)
    val_ids, val_images = contrastive_samples(manifest, val_split)
    batches = EpochBatches(
        CaptionDataset(manifest, input_ids, attention_mask, with_target=False),
        EpochSampler(train_ids, train_images, seed=seed, one_per_image=True, rank=rank, world_size=world),
        # Validation: a fixed caption per image (epoch 0 of a fixed seed), fixed order.
        EpochSampler(val_ids, val_images, seed=seed, one_per_image=True, shuffle=False, rank=rank, world_size=world),
        batch_size=cfg.per_rank_batch(world), num_workers=cfg.num_workers, drop_last=True)
    return ContrastiveObjective(model, batches, loss=cfg.loss, micro_batch=cfg.per_rank_micro_batch(world),
                                spec=spec, tokenizer=tokenizer)
