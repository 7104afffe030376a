"""CrossAttention: shapes, agreement with written-out attention, padding masked out."""

import math

import pytest
import torch

from jurassiglip.model.fusion import CrossAttention


def fusion(dim=16, inner_dim=32, heads=4):
    torch.manual_seed(0)
    return CrossAttention(dim=dim, inner_dim=inner_dim, heads=heads).eval()


def reference_attention(module, patches, text, mask):
    """The same computation written out with explicit softmax, head by head."""
    q = module.to_q(module.norm_query(patches))  # (B, N, inner)
    context = module.norm_context(text)
    k, v = module.to_k(context), module.to_v(context)  # (B, L, inner)
    hd = q.shape[-1] // module.heads
    outputs = []
    for head in range(module.heads):
        part = slice(head * hd, (head + 1) * hd)
        scores = q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(hd)  # (B, N, L)
        scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
        outputs.append(scores.softmax(dim=-1) @ v[..., part])  # (B, N, hd)
    return module.to_out(torch.cat(outputs, dim=-1))  # (B, N, D)


def test_shapes_and_reference():
    module = fusion()
    torch.manual_seed(1)
    patches, text = torch.randn(2, 9, 16), torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = module(patches, text, mask)
        expected = reference_attention(module, patches, text, mask)
    assert out.shape == (2, 9, 16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_no_biases_and_separate_norms():
    module = fusion()
    for linear in (module.to_q, module.to_k, module.to_v, module.to_out):
        assert linear.bias is None
    assert module.to_q.weight.shape == (32, 16) and module.to_out.weight.shape == (16, 32)
    assert module.norm_query is not module.norm_context


def test_padding_does_not_change_output():
    """Extra pad positions holding garbage, at two pad lengths, give the same output."""
    module = fusion()
    torch.manual_seed(2)
    patches, caption = torch.randn(1, 9, 16), torch.randn(1, 3, 16)
    short = torch.cat([caption, torch.randn(1, 1, 16)], dim=1)
    long = torch.cat([caption, 100 * torch.randn(1, 6, 16)], dim=1)
    with torch.no_grad():
        out_short = module(patches, short, torch.tensor([[1, 1, 1, 0]]))
        out_long = module(patches, long, torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0, 0]]))
        out_unmasked = module(patches, long, torch.ones(1, 9))
    torch.testing.assert_close(out_short, out_long, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out_long, out_unmasked, atol=1e-3)  # the mask is what makes them equal


def test_caption_without_real_tokens_gives_zeros():
    module = fusion()
    patches, text = torch.randn(2, 4, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        out = module(patches, text, torch.tensor([[0, 0, 0], [1, 0, 0]]))
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(4, 16))
    assert out[1].abs().sum() > 0


def test_heads_must_divide_inner_dim():
    with pytest.raises(ValueError, match="divisible"):
        CrossAttention(dim=16, inner_dim=30, heads=4)
