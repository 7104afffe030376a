"""Segmentation head: one mask logit per patch, upsampled to the image.

A per-patch MLP scores each fused patch token, the scores are laid back on
the patch grid and bilinearly upsampled to the mask size. Prototype sizes:
Linear(384 -> 512) + GELU + Linear(512 -> 1), 32x32 grid -> 512x512 logits.

Bilinear upsampling is separable: rows then columns, each a fixed (S, g)
matrix. Two small matmuls give F.interpolate's result (bilinear, half-pixel
centres) to float rounding, and their backward is two matmuls as well,
where the backward of the interpolation kernel was 7 % of a tiny stage-2
step on CPU (benchmarks R5).
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

    needs_images = False

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def decode(self, tokens: torch.Tensor, grid: int, out_size: int, images: torch.Tensor | None,
               text_tokens: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder interface (decoder.py `RefineHead.decode`): logits, and the tokens the no-target
        head reads, here the fused tokens themselves; the image and the caption are not read again."""
        return self(tokens, grid, out_size), tokens

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
        scores = self.mlp(tokens).reshape(batch, 1, grid, grid)  # (B, 1, g, g), row-major
        return bilinear_upsample(scores, out_size)  # (B, 1, S, S)


def interpolation_matrix(grid: int, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size, grid) weights of 1-D linear interpolation from `grid` to `size` points, half-pixel centres.

    Column j is F.interpolate's upsampling of the j-th unit vector, so the
    matrix is the operator F.interpolate(mode="linear", align_corners=False) applies.
    """
    unit = torch.eye(grid, dtype=dtype, device=device).unsqueeze(1)  # (g, 1, g)
    return F.interpolate(unit, size=size, mode="linear", align_corners=False)[:, 0].T  # (S, g)


def bilinear_upsample(scores: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, g, g) -> (B, C, size, size), equal to F.interpolate(mode="bilinear", align_corners=False)."""
    weights = interpolation_matrix(scores.shape[-1], size, scores.dtype, scores.device)  # (S, g)
    return weights @ scores @ weights.T  # (B, C, S, S)


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
