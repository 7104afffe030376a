"""Cross-attention from vision patches to text tokens.

Each patch token asks the caption which words concern it: queries are patch
tokens, keys and values are the projected text tokens, padded text positions
are masked out. The module returns only the attended context; the model adds
the residual (fused = patches + CrossAttention(...)), as the prototype does.
Prototype sizes: dim 384, inner 768, 4 heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head cross-attention, pre-LayerNorm on both inputs, no projection biases.

    Args:
        dim: width D of patch and text tokens.
        inner_dim: width of the Q/K/V projections, split across the heads.
        heads: number of attention heads; must divide inner_dim.
    """

    def __init__(self, dim: int, inner_dim: int, heads: int):
        super().__init__()
        if inner_dim % heads:
            raise ValueError(f"inner_dim {inner_dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        # to_* names keep clear of the LoRA target names (q_proj, ...) used on the backbones.
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, inner = x.shape
        return x.view(batch, length, self.heads, inner // self.heads).transpose(1, 2)  # (B, h, T, inner/h)

    def forward(self, patches: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Attend from every patch to the real text tokens.

        Args:
            patches: (B, N, D) patch tokens (queries).
            text: (B, L, D) text tokens (keys and values).
            text_mask: (B, L), nonzero for real tokens, 0 for padding.

        Returns:
            (B, N, D) attention output, without the residual. A caption with no
            real token contributes zeros.
        """
        batch, num_patches, _ = patches.shape
        context = self.norm_context(text)  # (B, L, D)
        q = self._split_heads(self.to_q(self.norm_query(patches)))  # (B, h, N, hd)
        k = self._split_heads(self.to_k(context))  # (B, h, L, hd)
        v = self._split_heads(self.to_v(context))  # (B, h, L, hd)

        keep = text_mask.bool()  # (B, L)
        has_text = keep.any(dim=-1)  # (B,)
        # A row with every position masked would softmax over nothing (NaN): let it attend
        # everywhere and zero its output below instead.
        allowed = (keep | ~has_text[:, None])[:, None, None, :]  # (B, 1, 1, L), broadcast over heads and queries
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, h, N, hd)
        attended = attended.transpose(1, 2).reshape(batch, num_patches, -1)  # (B, N, inner)
        out = self.to_out(attended)  # (B, N, D)
        return out * has_text[:, None, None].to(out.dtype)  # (B, N, D)
