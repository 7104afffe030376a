"""Vision and text towers: pretrained transformer backbones turned into token sets.

`VisionTower` wraps a transformers `DINOv3ViTModel` and returns its patch tokens
(what the fusion attends from) and its CLS token (what the contrastive loss
aligns). `TextTower` wraps a `Siglip2TextModel`, projects every token down to
the shared width (768 -> 384 in the prototype) and also returns a global text
feature, the masked mean of the projected tokens.

Either backbone may be a peft model (see `lora.py`): the towers only call it
and read its `config`, which peft forwards to the wrapped model.

The builders at the bottom make the two backbones from plain numbers: tiny
random ones for tests and the offline default, or pretrained ones from a hub
id or a local directory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import (
    AutoModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    Siglip2TextConfig,
    Siglip2TextModel,
)

logger = logging.getLogger(__name__)


class VisionTower(nn.Module):
    """DINOv3 ViT: images in, patch tokens and CLS token out.

    The DINOv3 token sequence is [CLS, registers..., patches...]
    (`DINOv3ViTEmbeddings` concatenates them in that order); the number of
    registers is read from `backbone.config.num_register_tokens` (4 in
    ViT-S/16+), never assumed. Patch tokens come in row-major grid order,
    as the patch convolution's output is flattened row by row.

    Normalisation replaces the DINOv3 image processor: images arrive already
    resized to S x S with values in 0..255, and are mapped to
    (x / 255 - mean) / std, the processor's rescale-then-normalise.

    Note: in train mode DINOv3 randomly rescales its RoPE patch coordinates
    (`config.pos_embed_rescale`, 2.0 by default); call `eval()` on the tower
    for deterministic features.

    Args:
        backbone: a `DINOv3ViTModel` (or a peft model wrapping one).
        image_mean: per-channel RGB mean on the 0..1 scale (ImageNet for DINOv3).
        image_std: per-channel RGB std on the 0..1 scale.
    """

    def __init__(self, backbone: nn.Module, image_mean: Sequence[float], image_std: Sequence[float]):
        super().__init__()
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 RGB values, got {list(image_mean)} and {list(image_std)}")
        self.backbone = backbone
        config = backbone.config
        self.num_prefix_tokens = 1 + int(config.num_register_tokens)  # CLS + registers precede the patches
        self.patch_size = _square_patch_size(config.patch_size)
        # Not persistent: they are constructor arguments, rebuilt from the config, not learned state.
        mean = torch.tensor(list(image_mean), dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(list(image_std), dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("image_mean", mean, persistent=False)
        self.register_buffer("image_std", std, persistent=False)

    @property
    def hidden_size(self) -> int:
        """Width D of the patch and CLS tokens."""
        return int(self.backbone.config.hidden_size)

    def grid(self, image_size: int) -> int:
        """Patches per side for a square image of `image_size` pixels."""
        if image_size % self.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {self.patch_size}")
        return image_size // self.patch_size

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map 0..255 images (uint8 or float, (B, 3, H, W)) to the backbone's input scale."""
        return (images.float() / 255.0 - self.image_mean) / self.image_std  # (B, 3, H, W)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of images.

        Args:
            images: (B, 3, S, S), uint8 or float in 0..255, S a multiple of the patch size.

        Returns:
            patch_tokens (B, N, D) with N = (S / patch)^2, and cls (B, D).
        """
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image of {height}x{width} is not a multiple of the patch size {self.patch_size}")
        pixels = self.normalize(images)  # (B, 3, S, S)
        hidden = self.backbone(pixel_values=pixels).last_hidden_state  # (B, 1 + R + N, D)
        cls = hidden[:, 0]  # (B, D)
        patches = hidden[:, self.num_prefix_tokens :]  # (B, N, D)
        expected = (height // self.patch_size) * (width // self.patch_size)
        if patches.shape[1] != expected:
            raise RuntimeError(
                f"backbone returned {patches.shape[1]} patch tokens after {self.num_prefix_tokens} prefix tokens, "
                f"expected {expected}"
            )
        return patches, cls


class TextTower(nn.Module):
    """SigLIP2 text tower: token ids in, projected tokens and a global feature out.

    The down projection (Linear hidden -> shared_dim, no bias, as in the
    prototype) maps every token to the width of the vision tokens so the
    fusion can attend to them and the contrastive loss can compare the global
    feature with the CLS token. Padded positions of the returned tokens hold
    arbitrary values: consumers must use the returned mask (the fusion does).

    SigLIP2 was trained on captions right-padded to 64 tokens with no
    attention mask inside the text tower (big_vision): its real tokens also
    attend to the pads, and the checkpoint's weights expect that. So the mask
    is passed into the backbone only when `mask_inside` is set (the tiny
    random tower, trained here with it); either way it hides the padding from
    the global feature here and from the cross-attention downstream.

    Args:
        backbone: a `Siglip2TextModel` (or a peft model wrapping one).
        shared_dim: width D of the projected tokens (= the vision hidden size).
        mask_inside: pass the attention mask to the backbone's self-attention.
    """

    def __init__(self, backbone: nn.Module, shared_dim: int, mask_inside: bool = True):
        super().__init__()
        self.backbone = backbone
        self.mask_inside = mask_inside
        # Named `projection`, not `down_proj`: that name is a LoRA target in the vision MLP.
        self.projection = nn.Linear(int(backbone.config.hidden_size), shared_dim, bias=False)

    @property
    def hidden_size(self) -> int:
        """Width D of the projected tokens."""
        return self.projection.out_features

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode a batch of right-padded captions.

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L), 1 for real tokens and 0 for padding.

        Returns:
            tokens (B, L, D), the same attention_mask (B, L), and global (B, D),
            the mean of the projected tokens over real positions.
        """
        inside = attention_mask if self.mask_inside else None
        hidden = self.backbone(input_ids=input_ids, attention_mask=inside).last_hidden_state  # (B, L, E)
        tokens = self.projection(hidden)  # (B, L, D)
        weights = attention_mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
        # clamp: a caption with no real token gets a zero global feature instead of 0/0
        global_feature = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)  # (B, D)
        return tokens, attention_mask, global_feature


def _square_patch_size(patch_size: int | Sequence[int]) -> int:
    """DINOv3 configs allow an int or an (h, w) pair; the pipeline needs square patches."""
    if isinstance(patch_size, int):
        return patch_size
    height, width = (int(p) for p in patch_size)
    if height != width:
        raise ValueError(f"non-square patches {height}x{width} are not supported")
    return height


def tiny_dinov3(
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    patch_size: int,
    image_size: int,
    num_register_tokens: int,
    use_gated_mlp: bool = False,
) -> DINOv3ViTModel:
    """A small randomly initialised DINOv3 ViT (the same class as the real backbone).

    Weights come from the caller's torch seed. `use_gated_mlp=True` gives the
    SwiGLU MLP of ViT-S/16+ (adds a `gate_proj` Linear); the default plain MLP
    is DINOv3ViTConfig's own default.
    """
    config = DINOv3ViTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        patch_size=patch_size,
        image_size=image_size,
        num_register_tokens=num_register_tokens,
        use_gated_mlp=use_gated_mlp,
    )
    return DINOv3ViTModel(config)


def tiny_siglip2_text(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    pad_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
) -> Siglip2TextModel:
    """A small randomly initialised SigLIP2 text tower (the same class as the real one).

    Weights come from the caller's torch seed. The special ids must be set:
    Siglip2TextConfig's defaults (bos 49406, eos 49407) lie outside a small
    vocabulary and make transformers warn.
    """
    config = Siglip2TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    return Siglip2TextModel(config)


def load_pretrained_vision(name_or_dir: str, *, revision: str | None = None,
                           local_files_only: bool = False) -> DINOv3ViTModel:
    """Load a pretrained DINOv3 ViT from a hub id or a local directory.

    Uses `AutoModel`, as the prototype did; anything but a `DINOv3ViTModel`
    (e.g. a DINOv3 ConvNeXt, which has no CLS/register/patch token layout) is
    refused. `local_files_only` keeps it to a local folder or the local
    Hugging Face cache.
    """
    with _quiet_load_report():
        model = AutoModel.from_pretrained(name_or_dir, revision=revision, local_files_only=local_files_only)
    if not isinstance(model, DINOv3ViTModel):
        raise TypeError(f"{name_or_dir!r} loads as {type(model).__name__}, expected a DINOv3ViTModel checkpoint")
    return model


def load_pretrained_text(name_or_dir: str, *, revision: str | None = None,
                         local_files_only: bool = False) -> Siglip2TextModel:
    """Load a pretrained SigLIP2 text tower from a hub id or a local directory.

    Accepts a text-only checkpoint and a full SigLIP2 checkpoint (such as
    google/siglip2-base-patch16-512, the prototype's). For the full one,
    `Siglip2TextModel.from_pretrained` picks `text_config` out of the
    Siglip2Config and the `text_model.*` weights out of the state dict, so the
    vision tower is never built; its weights are the expected leftovers (and
    transformers' per-key load report of them is silenced). Any missing text
    weight is an error.
    """
    with _quiet_load_report():
        model, info = Siglip2TextModel.from_pretrained(name_or_dir, revision=revision,
                                                       local_files_only=local_files_only, output_loading_info=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise RuntimeError(f"{name_or_dir!r} lacks SigLIP2 text weights: {missing[:10]} ({len(missing)} in all)")
    leftovers = [key for key in info["unexpected_keys"] if not key.startswith(("vision_model.", "logit_"))]
    if leftovers:
        logger.warning("unused weights in %s: %s", name_or_dir, sorted(leftovers)[:10])
    return model


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """transformers logs a table row per unused weight (hundreds for a full SigLIP2); checked here instead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
