"""Segmentation head: one mask logit per patch, upsampled to the image.

A per-patch MLP scores each fused patch token, the scores are laid back on
the patch grid and bilinearly upsampled to the mask size. Prototype sizes:
Linear(384 -> 512) + GELU + Linear(512 -> 1), 32x32 grid -> 512x512 logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegHead(nn.Module):
    """Per-patch MLP + bilinear upsampling to mask logits.

    Args:
        dim: width D of the fused patch tokens.
        hidden: hidden width of the MLP.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, tokens: torch.Tensor, grid: int, out_size: int) -> torch.Tensor:
        """Score patches and upsample.

        Args:
            tokens: (B, N, D) fused patch tokens in row-major grid order, N = grid^2.
            grid: patches per side.
            out_size: side of the square output, in pixels.

        Returns:
            (B, 1, out_size, out_size) mask logits.
        """
        batch, num_patches, _ = tokens.shape
        if num_patches != grid * grid:
            raise ValueError(f"{num_patches} tokens do not fill a {grid}x{grid} grid")
        scores = self.mlp(tokens)  # (B, N, 1)
        scores = scores.transpose(1, 2).reshape(batch, 1, grid, grid)  # (B, 1, g, g)
        return F.interpolate(scores, size=(out_size, out_size), mode="bilinear", align_corners=False)  # (B, 1, S, S)


class NoTargetHead(nn.Module):
    """Learned no-target verdict: does the caption name anything in the image?

    The fused patch tokens are pooled two ways, mean (how much of the image
    answers the caption) and max (does any patch answer it), and an MLP turns
    the pair into one logit; positive means "no target". SPEC §5 allows this in
    place of a rule on the predicted area (`evaluate.no_target_rule`).

    Args:
        dim: width D of the fused patch tokens.
        hidden: hidden width of the MLP.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) fused patch tokens -> (B,) no-target logits."""
        pooled = torch.cat([tokens.mean(dim=1), tokens.amax(dim=1)], dim=-1)  # (B, 2D)
        return self.mlp(pooled)[:, 0]  # (B,)
