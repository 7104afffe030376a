"""Models and batches the benchmarks share.

- `tiny()`: the default pipeline's pieces (the synthetic set, its manifest
  and tokenizer, built from params.yaml by the stage's own functions into a
  temporary folder, and a tiny model from the spec), once per run.
- `real_dims_model()`: the prototype's sizes with random weights, built from
  configs, no download: DINOv3 ViT-S/16+ (hidden 384, 12 layers, 6 heads,
  patch 16, 4 registers, gated SiLU MLP 1536, 512 px) and the SigLIP2 base
  text tower (hidden 768, 12 layers, 12 heads, MLP 3072, 64 tokens), with
  LoRA on both and the fusion/head sizes of params.yaml `model.real`. The
  text vocabulary is cut to 1,024 entries: the embedding is a lookup, so
  its 256k rows cost memory, not time.
- `Stage2Step`: one stage-2 training step on a fixed batch, from the fp16
  features (as the cache stores them) or with the frozen towers run live,
  through the loss functions of `jurassiglip.training.seg_finetune`.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from jurassiglip.config import FinetuneConfig, Params, TinyPreset, load_params
from jurassiglip.data.build_manifest import build_inputs
from jurassiglip.data.manifest import Manifest
from jurassiglip.data.source import SourceFiles
from jurassiglip.data.tokenizer import caption_tokenizer, tokenize
from jurassiglip.training.seg_finetune import cached_loss_fn, live_loss_fn, train_head_only
from jurassiglip.training.losses import no_target_loss, segmentation_loss
from jurassiglip.model.build import build_model
from jurassiglip.model.spec import ModelSpec
from jurassiglip.model.lora import add_lora
from jurassiglip.model.model import JurasSigLIP
from jurassiglip.model.towers import VisionTower

# DINOv3 ViT-S/16+ (facebook/dinov3-vits16plus-pretrain-lvd1689m config; SPEC appendix): 28.7 M parameters.
REAL_VISION = dict(hidden_size=384, intermediate_size=1536, use_gated_mlp=True, hidden_act="silu",
                   num_hidden_layers=12, num_attention_heads=6, patch_size=16, num_register_tokens=4,
                   key_bias=False)
# SigLIP2 base text tower (google/siglip2-base-patch16-512): 86 M parameters besides the embedding.
REAL_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
REAL_VOCAB = 1024  # the real one has 256k tokens: a bigger lookup table, the same FLOPs
CAPTION_TOKENS = (4, 12)  # real tokens per random caption at real dims (the rest is padding)


def offline() -> None:
    """Benchmarks never touch the network (set before any hub call)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


@dataclass
class Tiny:
    """The default (tiny preset) pipeline's inputs, as seg_finetune sees them."""

    params: Params
    source: SourceFiles           # the gRefCOCO-format synthetic set (what the prototype would read)
    manifest: Manifest
    tokenizer: Any
    input_ids: torch.Tensor       # (n_samples, L) every manifest row
    attention_mask: torch.Tensor  # (n_samples, L)

    def model(self, seed: int = 0) -> JurasSigLIP:
        """A fresh tiny model with LoRA (random weights: speed does not depend on them)."""
        torch.manual_seed(seed)
        return build_model(ModelSpec.from_params(self.params, self.tokenizer))

    def train_ids(self) -> np.ndarray:
        samples = self.manifest.samples
        return samples.loc[samples["split"] == self.params.data.train_split, "sample_id"].to_numpy().copy()


QUICK_IMAGE_SHARE = 5  # --quick builds 1/5 of the default synthetic images


@functools.cache
def tiny(quick: bool = False) -> Tiny:
    """Build the default data the way stages/build_manifest.py does, into a private temporary folder.

    Private, so that a `dvc repro` running next to the benchmarks (which swaps
    data/build_manifest/ atomically) cannot pull files from under them, and so
    that nothing but params.yaml is needed. Same seed, same dataset as the
    pipeline's; --quick builds a fifth of the images.
    """
    offline()
    params = load_params()
    if params.model.preset != "tiny" or params.data.source != "synthetic":
        raise SystemExit("benchmarks use the default tiny preset and synthetic data; params.yaml has "
                         f"model.preset={params.model.preset}, data.source={params.data.source}")
    if quick:
        syn = params.synthetic
        smaller = {split: max(1, n // QUICK_IMAGE_SHARE) for split, n in syn.n_images.items()}
        params = dataclasses.replace(params, synthetic=dataclasses.replace(syn, n_images=smaller))
    root = Path(tempfile.mkdtemp(prefix="jurassiglip_bench_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    source = build_inputs(params, root).source
    manifest = Manifest.load(root / "manifest")
    tokenizer = caption_tokenizer(params.model, root / "tokenizer")
    ids, mask = tokenize(tokenizer, manifest.samples["sentence"].tolist(), params.model.arch.text_max_len)
    return Tiny(params, source, manifest, tokenizer, ids, mask)


def real_dims_model(setup: Tiny, seed: int = 0) -> JurasSigLIP:
    """The prototype's model at full size with random weights.

    Built by jurassiglip's own build_model from a spec carrying the real
    numbers (so fusion, heads and LoRA are composed exactly as in the
    pipeline), then the vision backbone is swapped for the gated-SiLU-MLP
    DINOv3 of ViT-S/16+, which the tiny builder does not make.
    """
    offline()
    torch.manual_seed(seed)
    params = setup.params
    real, lora = params.model.real, params.lora
    arch = TinyPreset(
        image_size=real.image_size, patch_size=REAL_VISION["patch_size"],
        vision_hidden=REAL_VISION["hidden_size"], vision_layers=REAL_VISION["num_hidden_layers"],
        vision_heads=REAL_VISION["num_attention_heads"], vision_mlp=REAL_VISION["intermediate_size"],
        register_tokens=REAL_VISION["num_register_tokens"],
        text_hidden=REAL_TEXT["hidden_size"], text_layers=REAL_TEXT["num_hidden_layers"],
        text_heads=REAL_TEXT["num_attention_heads"], text_mlp=REAL_TEXT["intermediate_size"],
        text_max_len=real.text_max_len, text_tower_mask=real.text_tower_mask, shared_dim=real.shared_dim,
        fusion_inner_dim=real.fusion_inner_dim, fusion_heads=real.fusion_heads, head_hidden=real.head_hidden)
    spec = dataclasses.replace(ModelSpec.from_params(params, setup.tokenizer), vocab_size=REAL_VOCAB, arch=arch)
    model = build_model(spec)
    vision = DINOv3ViTModel(DINOv3ViTConfig(**REAL_VISION, image_size=real.image_size))
    vision, _ = add_lora(vision, lora.r, lora.alpha, lora.dropout, lora.targets)
    model.vision = VisionTower(vision, params.model.image_mean, params.model.image_std)
    return model


def backbone_millions(model: JurasSigLIP) -> tuple[float, float]:
    """Base (non-LoRA) parameters of the vision and text backbones, in millions."""

    def count(tower: torch.nn.Module) -> float:
        return sum(p.numel() for n, p in tower.backbone.named_parameters() if "lora_" not in n) / 1e6

    return count(model.vision), count(model.text)


def tiny_batch(setup: Tiny, size: int) -> dict[str, torch.Tensor]:
    """The first `size` training captions: images, tokens and targets from the manifest."""
    rows = setup.train_ids()[:size]
    manifest = setup.manifest
    images = np.array(manifest.images[manifest.samples["image_index"].to_numpy()[rows]])  # (B, S, S, 3)
    return {
        "image": torch.from_numpy(images).permute(0, 3, 1, 2),                   # (B, 3, S, S) uint8
        "input_ids": setup.input_ids[rows],
        "attention_mask": setup.attention_mask[rows],
        "target": torch.from_numpy(manifest.target_mask(rows)).float().unsqueeze(1),  # (B, 1, S, S)
        "no_target": torch.from_numpy(manifest.samples["no_target"].to_numpy(bool)[rows]),  # (B,)
    }


def real_batch(setup: Tiny, size: int, image_size: int, text_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Random images and captions at real dims; targets are manifest masks scaled up (nearest)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(CAPTION_TOKENS[0], CAPTION_TOKENS[1] + 1, (size,), generator=gen)
    mask = (torch.arange(text_len)[None, :] < lengths[:, None]).long()  # (B, L)
    ids = torch.randint(4, REAL_VOCAB, (size, text_len), generator=gen) * mask  # pad id 0
    rows = setup.train_ids()[:size]
    small = setup.manifest.target_mask(rows)  # (B, s, s)
    factor = image_size // small.shape[-1]
    target = small.repeat(factor, axis=1).repeat(factor, axis=2)
    return {
        "image": torch.randint(0, 256, (size, 3, image_size, image_size), generator=gen, dtype=torch.uint8),
        "input_ids": ids,
        "attention_mask": mask,
        "target": torch.from_numpy(target).float().unsqueeze(1),  # (B, 1, S, S)
        "no_target": torch.from_numpy(setup.manifest.samples["no_target"].to_numpy(bool)[rows]),  # (B,)
    }


class Stage2Step:
    """One stage-2 step (fusion + head, AdamW) on a fixed batch.

    `cached()` starts from fp16 patch and text tokens, exactly what the
    feature cache holds; `live()` runs the frozen towers (no grad) first.
    Both go through jurassiglip.training.seg_finetune's loss functions.
    """

    def __init__(self, model: JurasSigLIP, cfg: FinetuneConfig, batch: dict[str, torch.Tensor]):
        self.model = model
        self.cfg = cfg
        trainable = model.trainable_for_finetune(with_no_target=cfg.no_target_weight > 0)
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        train_head_only(model)
        self.live_batch = batch
        with torch.no_grad():
            patches, _ = model.encode_image(batch["image"])  # (B, N, D)
            tokens, token_mask, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])  # (B, L, D)
        self.cached_batch = {"patches": patches.half(), "text": tokens.half(), "text_mask": token_mask.bool(),
                             "target": batch["target"], "no_target": batch["no_target"]}
        self._cached_loss = cached_loss_fn(model, cfg)
        self._live_loss = live_loss_fn(model, cfg)

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def cached(self) -> None:
        self._step(self._cached_loss(self.cached_batch))

    def live(self) -> None:
        self._step(self._live_loss(self.live_batch))

    def cached_with_loss(self, seg_loss) -> Callable[[], None]:
        """A cached step whose mask loss is `seg_loss(logits, target)` (e.g. compiled); the rest as
        jurassiglip.training.seg_finetune.stage2_loss computes it."""
        batch, cfg = self.cached_batch, self.cfg

        def step() -> None:
            logits, nt_logits = self.model.decode(batch["patches"], batch["text"], batch["text_mask"], batch["image"])
            loss = seg_loss(logits, batch["target"])
            if cfg.no_target_weight:
                loss = loss + cfg.no_target_weight * no_target_loss(nt_logits, batch["no_target"])
            self._step(loss)

        return step

    def seg_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mask loss with this run's weights (what stage2_loss applies)."""
        cfg = self.cfg
        return segmentation_loss(logits, target, dice_weight=cfg.dice_weight, focal_weight=cfg.focal_weight,
                                 alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)
