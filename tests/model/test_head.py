"""SegHead: per-patch MLP, row-major grid layout, bilinear upsampling."""

import pytest
import torch
import torch.nn.functional as F

from jurassiglip.model.head import NoTargetHead, SegHead, bilinear_upsample, interpolation_matrix


def test_shapes():
    torch.manual_seed(0)
    head = SegHead(dim=16, hidden=24)
    logits = head(torch.randn(2, 16, 16), grid=4, out_size=64)
    assert logits.shape == (2, 1, 64, 64)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear"]
    assert head.mlp[0].weight.shape == (24, 16) and head.mlp[2].weight.shape == (1, 24)


def test_patches_are_laid_out_row_major():
    """Patch k lands at row k // grid, column k % grid (the order DINOv3 flattens its patch grid in)."""
    head = SegHead(dim=1, hidden=1)
    with torch.no_grad():  # make the MLP the identity on nonnegative inputs: GELU(x) ~ x for large x
        head.mlp[0].weight.fill_(1.0)
        head.mlp[0].bias.fill_(100.0)
        head.mlp[2].weight.fill_(1.0)
        head.mlp[2].bias.fill_(-100.0)
        tokens = torch.arange(9.0).view(1, 9, 1)
        logits = head(tokens, grid=3, out_size=3)  # same size: bilinear is the identity
    torch.testing.assert_close(logits[0, 0], torch.arange(9.0).view(3, 3), atol=1e-3, rtol=0)


def test_upsampling_is_bilinear_without_corner_alignment():
    torch.manual_seed(0)
    head = SegHead(dim=8, hidden=8)
    tokens = torch.randn(1, 4, 8)
    with torch.no_grad():
        coarse = head(tokens, grid=2, out_size=2)
        fine = head(tokens, grid=2, out_size=8)
    torch.testing.assert_close(fine, F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False))


def test_interpolation_matrix_by_hand():
    """2 -> 4 points, half-pixel centres: outputs sit at -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)."""
    weights = interpolation_matrix(2, 4, torch.float32, torch.device("cpu"))
    expected = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(weights @ torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.25, 0.75, 1.0]))


@pytest.mark.parametrize("grid,size", [(16, 128), (32, 512), (5, 13), (3, 3)])
def test_separable_upsampling_equals_interpolate_with_its_gradient(grid, size):
    torch.manual_seed(0)
    scores = torch.randn(3, 1, grid, grid, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, size, size, dtype=torch.float64)
    ours = bilinear_upsample(scores, size)
    reference = F.interpolate(scores, size=(size, size), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, reference)
    grad_ours, = torch.autograd.grad((ours * weight).sum(), scores)
    grad_reference, = torch.autograd.grad((reference * weight).sum(), scores)
    torch.testing.assert_close(grad_ours, grad_reference)


def test_grid_must_match_token_count():
    head = SegHead(dim=8, hidden=8)
    with pytest.raises(ValueError, match="3x3 grid"):
        head(torch.randn(1, 16, 8), grid=3, out_size=12)


def test_no_target_head_gives_one_logit_per_caption():
    torch.manual_seed(0)
    head = NoTargetHead(dim=16, hidden=24)
    assert head(torch.randn(3, 9, 16)).shape == (3,)


def test_no_target_head_sees_a_single_patch():
    """Max pooling: one patch that answers the caption moves the verdict, whatever the grid size."""
    torch.manual_seed(0)
    head = NoTargetHead(dim=8, hidden=16).eval()
    tokens = torch.zeros(1, 64, 8)
    spiked = tokens.clone()
    spiked[0, 37, 2] = 50.0  # one patch of 64; the mean moves by 50/64, the max by 50
    with torch.no_grad():
        assert not torch.allclose(head(tokens), head(spiked))
        # the same spike in either position gives the same logit: pooling ignores where
        moved = tokens.clone()
        moved[0, 5, 2] = 50.0
        torch.testing.assert_close(head(spiked), head(moved))
