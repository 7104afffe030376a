"""JurasSigLIP: the two towers, the fusion and the head, composed.

Data flow (see the shape legend in `jurassiglip.model`):

    images (B, 3, S, S) -> VisionTower -> patches (B, N, D), cls (B, D)
    ids, mask (B, L)    -> TextTower   -> tokens (B, L, D), mask (B, L), global (B, D)
    fused = patches + CrossAttention(patches, tokens, mask)            (B, N, D)
    logits, refined = head.decode(fused, grid, S, images, tokens, mask) (B, 1, S, S), (B, N, D)
    no_target_logit = NoTargetHead(refined)                            (B,)

The head is the decoder `model.decoder` chooses: the prototype's SegHead
(per-patch MLP, refined = fused) or decoder.py's RefineHead.

Stage 1 aligns normalised CLS and global text features (`contrastive_features`);
stage 2 trains fusion and both heads on frozen, possibly cached, features
(`decode`; `segment` when only the mask is wanted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from jurassiglip.model.fusion import CrossAttention
from jurassiglip.model.decoder import RefineHead
from jurassiglip.model.head import NoTargetHead, SegHead
from jurassiglip.model.lora import merge_lora as merge_adapters
from jurassiglip.model.towers import TextTower, VisionTower


class JurasSigLIP(nn.Module):
    """Referring-expression segmenter built from ready-made parts.

    Args:
        vision: the image tower.
        text: the text tower; its projected width must equal the vision width.
        fusion: cross-attention from patches to text tokens.
        head: the decoder: SegHead (prototype) or RefineHead.
        no_target: the no-target head (one logit per caption).
        logit_scale_init: initial contrastive logit scale, log space (CLIP: log(1/0.07)).
        logit_scale_max: upper clamp of the scale, log space (CLIP: log(100)).
        image_size: side S of the square input images and output masks.
        logit_bias_init: initial bias of the sigmoid contrastive loss; -10 is SigLIP's
            initialisation (Zhai et al. 2023). Unused (and frozen) with the CLIP loss.
    """

    def __init__(
        self,
        vision: VisionTower,
        text: TextTower,
        fusion: CrossAttention,
        head: SegHead | RefineHead,
        no_target: NoTargetHead,
        logit_scale_init: float,
        logit_scale_max: float,
        image_size: int,
        logit_bias_init: float = -10.0,
    ):
        super().__init__()
        if vision.hidden_size != text.hidden_size:
            raise ValueError(
                f"vision width {vision.hidden_size} != projected text width {text.hidden_size}: "
                "the text projection must map to the vision hidden size"
            )
        self.vision = vision
        self.text = text
        self.fusion = fusion
        self.head = head
        self.no_target = no_target
        self.image_size = image_size
        self.grid = vision.grid(image_size)
        self.logit_scale_max = float(logit_scale_max)
        self.logit_scale_raw = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias_init)))

    @property
    def logit_scale(self) -> torch.Tensor:
        """The contrastive logit scale (log space, scalar), clamped to [0, logit_scale_max]."""
        return self.logit_scale_raw.clamp(0.0, self.logit_scale_max)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the raw parameter in place; call after each optimizer step, as CLIP does.

        `clamp` has zero gradient outside its range, so a raw value that drifted
        past the bound could never be pulled back by the loss.
        """
        self.logit_scale_raw.clamp_(0.0, self.logit_scale_max)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) images in 0..255 -> patches (B, N, D), cls (B, D)."""
        return self.vision(images)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L) ids and mask -> tokens (B, L, D), mask (B, L), global (B, D)."""
        return self.text(input_ids, attention_mask)

    def fuse(self, patches: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Patch tokens that have read the caption.

        Cached features (e.g. stored in fp16) are cast to the fusion's dtype.

        Args:
            patches: (B, N, D) patch tokens, N = grid^2.
            text_tokens: (B, L, D) projected text tokens.
            text_mask: (B, L), 1 for real tokens.

        Returns:
            (B, N, D) fused tokens.
        """
        dtype = self.fusion.to_q.weight.dtype
        patches = patches.to(dtype)  # (B, N, D)
        text_tokens = text_tokens.to(dtype)  # (B, L, D)
        return patches + self.fusion(patches, text_tokens, text_mask)  # (B, N, D)

    def decode(self, patches: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
               images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What stage 2 trains, from live or cached features: mask logits (B, 1, S, S) and
        no-target logits (B,). Arguments as in `fuse`; `images` (B, 3, S, S) in 0..255 are
        read by a decoder with an image guide (`head.needs_images`) and ignored otherwise."""
        fused = self.fuse(patches, text_tokens, text_mask)  # (B, N, D)
        logits, refined = self.head.decode(fused, self.grid, self.image_size, images, text_tokens.to(fused.dtype),
                                           text_mask)
        return logits, self.no_target(refined)

    def segment(self, patches: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                images: torch.Tensor | None = None) -> torch.Tensor:
        """Mask logits (B, 1, S, S) only. Arguments as in `decode`."""
        return self.decode(patches, text_tokens, text_mask, images)[0]

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) and captions (B, L) -> mask logits (B, 1, S, S)."""
        patches, _ = self.encode_image(images)  # (B, N, D)
        tokens, mask, _ = self.encode_text(input_ids, attention_mask)  # (B, L, D), (B, L)
        return self.segment(patches, tokens, mask, images)  # (B, 1, S, S)

    def contrastive_features(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised CLS (B, D) and global text feature (B, D), for the stage 1 loss."""
        _, cls = self.encode_image(images)  # (B, D)
        _, _, global_feature = self.encode_text(input_ids, attention_mask)  # (B, D)
        return F.normalize(cls, dim=-1), F.normalize(global_feature, dim=-1)

    def merge_lora(self) -> None:
        """Fold the LoRA adapters of both towers into their weights, for inference.

        The function computed is unchanged; the towers' backbones become plain
        transformers models again (so the state_dict keys lose peft's prefixes).
        """
        for tower in (self.vision, self.text):
            if isinstance(tower.backbone, PeftModel):
                tower.backbone = merge_adapters(tower.backbone)

    def _set_trainable(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        for param in self.parameters():
            param.requires_grad_(False)
        for param in params:
            param.requires_grad_(True)
        return params

    def trainable_for_pretrain(self, with_logit_bias: bool = False) -> list[nn.Parameter]:
        """Stage 1: LoRA adapters of both towers, the text projection and the logit scale.

        `with_logit_bias=True` adds the sigmoid loss's bias. Everything else is
        frozen. Returns the trainable parameters (for the optimizer).
        """
        lora = [p for tower in (self.vision, self.text) for n, p in tower.named_parameters() if "lora_" in n]
        extra = [self.logit_bias] if with_logit_bias else []
        return self._set_trainable([*lora, *self.text.projection.parameters(), self.logit_scale_raw, *extra])

    def trainable_for_finetune(self, with_no_target: bool = True) -> list[nn.Parameter]:
        """Stage 2: cross-attention, segmentation head and (unless its loss weight is 0) the
        no-target head; both towers frozen."""
        extra = list(self.no_target.parameters()) if with_no_target else []
        return self._set_trainable([*self.fusion.parameters(), *self.head.parameters(), *extra])

    def trained_state_keys(self) -> list[str]:
        """The state_dict keys training can change, in state_dict order: all but the towers' base weights.

        That is the LoRA adapters, the text projection, the fusion, both heads
        and the logit scale and bias: what a checkpoint of pretrained towers
        stores (see checkpoint.py); the base weights come from their checkpoints.
        """
        base = ("vision.backbone.", "text.backbone.")
        return [key for key in self.state_dict() if not key.startswith(base) or "lora_" in key]
