"""The refinement decoder: patches that see each other after reading the caption, then a sharper mask.

The prototype's head (head.py `SegHead`) scores each fused patch alone. But
"the leftmost circle" or "the largest shape" ask for evidence no single
patch token holds, and DINOv3 carries positions only as RoPE inside its
attention. `RefineHead` adds, after the cross-attention:

    fused (B, N, D) + 2-D sin-cos position code
      -> `blocks` x MixBlock (pre-norm residual 3x3 convolution over
         the patch grid, at half width)                                 (B, N, D)
      -> per-patch MLP -> coarse logits                                 (B, 1, g, g)
      -> ImageGuide (optional): 4x4-pixel cells of the image, modulated
         by the caption (FiLM of its mean token), refine the upsampled
         logits at 1/4 of the image size                                (B, 1, S/4, S/4)
      -> bilinear upsampling                                            (B, 1, S, S)

The no-target head reads the refined tokens. The last layer of every
residual branch (and the guide's correction and caption modulation) starts at
zero, so an untrained RefineHead is a per-patch MLP over position-coded
tokens, upsampled: refinement is learned from there.
dinov3.seg and CAT-Seg refine the image-text correlation the same way
(spatial aggregation, then an upsampler guided by higher-resolution features).

Modules take plain numbers; model/build.py translates `model.decoder`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jurassiglip.model.head import bilinear_upsample


def sincos_2d(dim: int, grid: int, device: torch.device | None = None) -> torch.Tensor:
    """(dim, grid, grid) fixed 2-D sine-cosine position code (MAE's): half the channels encode
    the row, half the column, each as sin/cos pairs of geometrically spaced frequencies.

    Args:
        dim: channels, a multiple of 4.
        grid: patches per side.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos code needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)  # (D/4,)
    pos = torch.arange(grid, dtype=torch.float64, device=device)
    angles = pos[:, None] * omega[None]  # (g, D/4)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (g, D/2)
    rows = axis[:, None, :].expand(grid, grid, dim // 2)   # varies down the rows
    cols = axis[None, :, :].expand(grid, grid, dim // 2)   # varies along the columns
    return torch.cat([rows, cols], dim=-1).permute(2, 0, 1).float()  # (D, g, g)


class MixBlock(nn.Module):
    """x + up(GELU(conv3x3(down(LN(x))))): each patch mixes with its 3x3 neighbours; starts as identity.

    The convolution runs at half the width (a bottleneck): on CPU a full-width
    3x3 convolution over the grid cost 4x the prototype's whole head, the
    bottleneck a third of that (benchmarks in the issue's closing note).

    Args:
        dim: width D of the tokens.
        width: width of the 3x3 convolution.
    """

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, width)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, grid: int) -> torch.Tensor:
        """(B, N, D) tokens in row-major grid order -> (B, N, D)."""
        batch, num_patches, _ = x.shape
        h = self.down(self.norm(x)).transpose(1, 2).reshape(batch, -1, grid, grid)  # (B, W, g, g)
        h = F.gelu(self.conv(h)).flatten(2).transpose(1, 2)  # (B, N, W)
        return x + self.up(h)


class ImageGuide(nn.Module):
    """Refines coarse logits at 1/4 of the image size from the image itself, reading the caption again.

    A 4x4 stride-4 convolution cuts the image into 4-pixel cells; the
    caption's mean token scales and shifts their features (FiLM); a 1x1
    convolution mixes them with the refined patch tokens and the upsampled
    coarse logits, and a 3x3 convolution outputs the correction.

    With `to_grid`, the cells also feed the patch grid: two more
    convolutions (stride 2, then 3x3, at 2C channels; average-pooled to the
    grid when it is coarser than S/8) see outlines about 28 pixels across,
    and a linear map adds them to the fused tokens before the mixing blocks,
    for what the frozen vision tower's patch tokens do not keep.

    Args:
        dim: width D of the refined patch tokens (and of the text tokens).
        channels: width C of the cell features.
        to_grid: also feed the patch grid (see above).
    """

    def __init__(self, dim: int, channels: int, to_grid: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 4, stride=4)
        self.outline = None
        if to_grid:
            self.outline = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.GELU(),
                                         nn.Conv2d(2 * channels, 2 * channels, 3, padding=1), nn.GELU())
            self.to_tokens = nn.Linear(2 * channels, dim)
            nn.init.zeros_(self.to_tokens.weight)  # the tokens as they are at the start
            nn.init.zeros_(self.to_tokens.bias)
        self.film = nn.Linear(dim, 2 * channels)          # caption -> per-channel scale and shift of the cells
        self.tokens = nn.Linear(dim, channels)            # refined patch tokens -> C channels
        self.mix = nn.Conv2d(2 * channels + 1, channels, 1)
        self.out = nn.Conv2d(channels, 1, 3, padding=1)
        for layer in (self.film, self.out):  # no modulation and no correction at the start
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def cells(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, 3, S, S) pixels in 0..255, S a multiple of 4 -> cell features (B, C, S/4, S/4)."""
        return F.gelu(self.stem(images.to(dtype) / 255.0 - 0.5))

    def grid_features(self, cells: torch.Tensor, grid: int) -> torch.Tensor | None:
        """Cell features (B, C, S/4, S/4) -> what they add to the fused tokens (B, N, D); None without to_grid."""
        if self.outline is None:
            return None
        outline = self.outline(cells)  # (B, 2C, S/8, S/8)
        if outline.shape[-1] != grid:
            outline = F.adaptive_avg_pool2d(outline, grid)  # (B, 2C, g, g)
        return self.to_tokens(outline.flatten(2).transpose(1, 2))  # (B, N, D)

    def forward(self, cells: torch.Tensor, tokens: torch.Tensor, coarse: torch.Tensor,
                caption: torch.Tensor) -> torch.Tensor:
        """Logits at a quarter of the image size.

        Args:
            cells: (B, C, S/4, S/4) from `cells`.
            tokens: (B, N, D) refined patch tokens, N = g^2.
            coarse: (B, 1, g, g) coarse mask logits.
            caption: (B, D) mean of the caption's real tokens.

        Returns:
            (B, 1, S/4, S/4) logits.
        """
        scale, shift = self.film(caption).chunk(2, dim=-1)  # (B, C) each
        cells = cells * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        size, grid = cells.shape[-1], coarse.shape[-1]
        up = bilinear_upsample(coarse, size)  # (B, 1, S/4, S/4)
        context = self.tokens(tokens).transpose(1, 2).reshape(len(tokens), -1, grid, grid)  # (B, C, g, g)
        context = bilinear_upsample(context, size)  # (B, C, S/4, S/4)
        return up + self.out(F.gelu(self.mix(torch.cat([cells, context, up], dim=1))))


class RefineHead(nn.Module):
    """Spatial refinement over the fused patch grid, a per-patch MLP, and an optional image guide.

    Args:
        dim: width D of the fused patch tokens (a multiple of 4: the position code).
        hidden: hidden width of the per-patch MLP.
        blocks: residual 3x3 convolution blocks over the grid.
        guide_channels: width of the image guide; 0 = no guide (bilinear upsampling of the grid).
        guide_to_grid: the guide's cells also feed the patch grid (`ImageGuide`'s to_grid).
    """

    needs_images: bool

    def __init__(self, dim: int, hidden: int, blocks: int, guide_channels: int, guide_to_grid: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(MixBlock(dim, dim // 2) for _ in range(blocks))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.guide = ImageGuide(dim, guide_channels, guide_to_grid) if guide_channels else None
        self.needs_images = self.guide is not None
        self.dim = dim

    def decode(self, tokens: torch.Tensor, grid: int, out_size: int, images: torch.Tensor | None,
               text_tokens: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused tokens (B, N, D) -> mask logits (B, 1, S, S) and the refined tokens (B, N, D).

        Args:
            images: (B, 3, S, S) pixels in 0..255; needed when there is an image guide.
            text_tokens, text_mask: (B, L, D), (B, L): the caption, read again by the guide.
        """
        batch, num_patches, dim = tokens.shape
        if num_patches != grid * grid:
            raise ValueError(f"{num_patches} tokens do not fill a {grid}x{grid} grid")
        position = sincos_2d(dim, grid, tokens.device).to(tokens.dtype).flatten(1).T  # (N, D), row-major
        refined = tokens + position
        cells = None
        if self.guide is not None:
            if images is None:
                raise ValueError("this decoder's image guide needs the images (pass images= to decode)")
            cells = self.guide.cells(images, tokens.dtype)  # (B, C, S/4, S/4)
            outline = self.guide.grid_features(cells, grid)
            if outline is not None:
                refined = refined + outline
        for block in self.blocks:
            refined = block(refined, grid)  # (B, N, D)
        coarse = self.mlp(refined).reshape(batch, 1, grid, grid)  # (B, 1, g, g)
        if cells is None:
            return bilinear_upsample(coarse, out_size), refined
        weights = text_mask.to(refined.dtype)[..., None]  # (B, L, 1)
        caption = (text_tokens.to(refined.dtype) * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, D)
        fine = self.guide(cells, refined, coarse, caption)  # (B, 1, S/4, S/4)
        return bilinear_upsample(fine, out_size), refined
