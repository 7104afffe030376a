"""Losses checked against hand-computed values and their defining properties."""

import math

import pytest
import torch
import torch.nn.functional as F

from jurassiglip.training.losses import clip_loss, dice_loss, focal_loss, no_target_loss, segmentation_loss, sigmoid_loss


def softplus(x):
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------- clip_loss


def test_clip_loss_hand_computed_2x2():
    """images e0, e1; texts (0.6, 0.8), e1; scale exp(log 2) = 2.

    logits = 2 * img @ txt.T = [[1.2, 0.0],
                                [1.6, 2.0]]
    image->text rows: -log softmax picks the diagonal
        row 0: log(1 + e^(0 - 1.2)) = softplus(-1.2) = 0.263282
        row 1: log(1 + e^(1.6 - 2)) = softplus(-0.4) = 0.513015
    text->image columns:
        col 0: (1.2 vs 1.6), target 1.2: softplus(0.4) = 0.913015
        col 1: (0.0 vs 2.0), target 2.0: softplus(-2)  = 0.126928
    loss = ((0.263282 + 0.513015) / 2 + (0.913015 + 0.126928) / 2) / 2 = 0.454060
    """
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    expected = ((softplus(-1.2) + softplus(-0.4)) / 2 + (softplus(0.4) + softplus(-2.0)) / 2) / 2
    assert expected == pytest.approx(0.454060, abs=1e-6)
    loss = clip_loss(image, text, torch.tensor(math.log(2.0)))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_clip_loss_distinct_ids_equal_standard_clip():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(2.3)
    logits = scale.exp() * image @ text.T
    labels = torch.arange(5)
    standard = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(clip_loss(image, text, scale), standard)
    torch.testing.assert_close(clip_loss(image, text, scale, image_ids=torch.tensor([7, 3, 9, 0, 4])), standard)


def same_image_batch():
    """Pairs 0 and 1: two identical captions of one image, seen as two slightly different
    image embeddings (views); pair 2: another image."""
    image = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[0.9, 0.3, 0.1], [0.9, 0.3, 0.1], [0.0, 0.1, 1.0]]), dim=-1)
    return image, text.requires_grad_(True)


def test_clip_loss_same_image_captions_are_positives():
    """Two views a, a' of one image and two captions, each caption closer to the *other* view.
    Without ids the pairing (a, t0), (a', t1) is enforced and the batch is penalised; with ids any
    caption of the image may match any view: the loss is lower and does not depend on the pairing."""
    image = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[0.6, 0.8, 0.0], [1.0, 0.1, 0.0], [0.0, 0.1, 1.0]]), dim=-1)
    swapped = text[[1, 0, 2]]
    ids, scale = torch.tensor([0, 0, 1]), torch.tensor(math.log(10.0))
    with_ids = clip_loss(image, text, scale, image_ids=ids)
    assert with_ids.item() < clip_loss(image, text, scale).item()
    torch.testing.assert_close(clip_loss(image, swapped, scale, image_ids=ids), with_ids)
    assert clip_loss(image, swapped, scale).item() != pytest.approx(clip_loss(image, text, scale).item())


def test_clip_loss_same_image_captions_are_not_pushed_apart():
    """With ids the two identical captions get identical gradients (they stay together);
    without ids, the loss pulls them apart, each toward its own view of the image."""
    scale = torch.tensor(math.log(10.0))
    for ids, apart in ((torch.tensor([0, 0, 1]), False), (None, True)):
        image, text = same_image_batch()
        clip_loss(image, text, scale, image_ids=ids).backward()
        stepped = F.normalize(text.detach() - 0.5 * text.grad, dim=-1)
        cosine = (stepped[0] @ stepped[1]).item()
        if apart:
            assert cosine < 1 - 1e-4
        else:
            torch.testing.assert_close(text.grad[0], text.grad[1])
            assert cosine == pytest.approx(1.0, abs=1e-6)


def test_clip_loss_ids_change_nothing_when_views_are_identical():
    """A deterministic tower gives one image the same embedding in every row: the duplicate
    columns already share the softmax mass, so soft and hard targets agree in value and gradient."""
    torch.manual_seed(0)
    image = F.normalize(torch.randn(2, 4), dim=-1)[[0, 0, 1]]  # rows 0 and 1: the same image
    text = F.normalize(torch.randn(3, 4), dim=-1)
    scale = torch.tensor(2.0)
    results = []
    for image_ids in (torch.tensor([5, 5, 6]), None):
        leaf = text.clone().requires_grad_(True)
        loss = clip_loss(image, leaf, scale, image_ids=image_ids)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_clip_loss_checks_shapes():
    with pytest.raises(ValueError, match="image_ids"):
        clip_loss(torch.ones(2, 3), torch.ones(2, 3), 0.0, image_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="one shape"):
        clip_loss(torch.ones(2, 3), torch.ones(3, 3), 0.0)


# ------------------------------------------------------------- sigmoid_loss


def test_sigmoid_loss_hand_computed_2x2():
    """img = txt = identity, scale exp(0) = 1, bias 0 -> logits = I.
    Diagonal (label +1, logit 1): softplus(-1) = 0.313262 each.
    Off-diagonal (label -1, logit 0): softplus(0) = log 2 = 0.693147 each.
    Sum over the 4 pairs / B = (2 * 0.313262 + 2 * 0.693147) / 2 = 1.006409."""
    eye = torch.eye(2)
    loss = sigmoid_loss(eye, eye, torch.tensor(0.0), torch.tensor(0.0))
    assert loss.item() == pytest.approx(softplus(-1.0) + math.log(2.0), abs=1e-6)


def test_sigmoid_loss_signs():
    eye = torch.eye(2)
    swapped = eye.flip(0)
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-5.0)
    aligned = sigmoid_loss(eye, eye, scale, bias)
    crossed = sigmoid_loss(eye, swapped, scale, bias)
    assert aligned.item() < crossed.item()
    # ids [0, 0]: the off-diagonal pairs become positives (label +1), so matching them is rewarded
    ones = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert sigmoid_loss(ones, ones, scale, bias, image_ids=torch.tensor([0, 0])).item() < sigmoid_loss(
        ones, ones, scale, bias
    ).item()
    # logits: positives 10 (already confident), negatives 0 (undecided): the loss asks for a lower
    # bias, i.e. a positive gradient on it. By hand, d/db of -(1/B) sum log sigmoid(label * (logit + b)):
    # -(1/B) sum label * sigmoid(-label * logit) = -(1/2) * (2 * sigmoid(-10) - 2 * sigmoid(0)) = 0.5 - sigmoid(-10)
    bias = torch.tensor(0.0, requires_grad=True)
    sigmoid_loss(eye, eye, torch.tensor(math.log(10.0)), bias).backward()
    assert bias.grad.item() == pytest.approx(0.5 - 1 / (1 + math.exp(10)), rel=1e-6)


# ---------------------------------------------------------------- dice_loss


def test_dice_perfect_and_totally_wrong():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    perfect = (target * 2 - 1) * 50  # +50 inside, -50 outside
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    # inter 0: loss = 1 - 1 / (48 + 16 + 1)
    assert dice_loss(-perfect, target).item() == pytest.approx(1 - 1 / 65, abs=1e-6)


def test_dice_empty_target_and_empty_prediction_is_zero():
    target = torch.zeros(1, 1, 8, 8)
    assert dice_loss(torch.full((1, 1, 8, 8), -50.0), target).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(torch.full((1, 1, 8, 8), 50.0), target).item() == pytest.approx(1 - 1 / 65, abs=1e-6)


def test_dice_is_mean_over_batch():
    target = torch.zeros(2, 1, 4, 4)
    target[0, :, :2] = 1
    logits = torch.randn(2, 1, 4, 4)
    each = [dice_loss(logits[i : i + 1], target[i : i + 1]) for i in range(2)]
    torch.testing.assert_close(dice_loss(logits, target), (each[0] + each[1]) / 2)


# --------------------------------------------------------------- focal_loss


def test_focal_single_pixel_by_hand():
    """Foreground pixel, logit 0: p = 0.5, p_t = 0.5, alpha_t = 0.25:
        0.25 * (1 - 0.5)^2 * -log 0.5 = 0.0625 * 0.693147 = 0.043322.
    Background pixel, logit log 3: p = 0.75, p_t = 0.25, alpha_t = 0.75:
        0.75 * (1 - 0.25)^2 * -log 0.25 = 0.421875 * 1.386294 = 0.584843."""
    one = torch.ones(1, 1, 1, 1)
    assert focal_loss(torch.zeros(1, 1, 1, 1), one, alpha=0.25, gamma=2.0).item() == pytest.approx(0.043322, abs=1e-6)
    background = focal_loss(torch.full((1, 1, 1, 1), math.log(3.0)), 0 * one, alpha=0.25, gamma=2.0)
    assert background.item() == pytest.approx(0.584843, abs=1e-6)


def test_focal_is_mean_over_pixels_and_reduces_to_weighted_bce():
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    assert focal_loss(logits, target, alpha=0.25, gamma=2.0).item() == pytest.approx((0.043322 + 0.584843) / 2, abs=1e-6)
    # gamma 0, alpha 0.5: half the plain binary cross-entropy
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 4, 4), (torch.rand(2, 1, 4, 4) > 0.5).float()
    torch.testing.assert_close(
        focal_loss(logits, target, alpha=0.5, gamma=0.0), 0.5 * F.binary_cross_entropy_with_logits(logits, target)
    )


def test_no_target_loss_is_binary_cross_entropy_by_hand():
    # logit 0 -> p = 0.5 -> -log 0.5 for either label; logit ln 3 -> p = 0.75 -> -log 0.75 for label 1
    logits = torch.tensor([0.0, math.log(3.0)])
    labels = torch.tensor([False, True])
    expected = (math.log(2.0) - math.log(0.75)) / 2
    assert no_target_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("as_bool", [False, True])
def test_segmentation_loss_is_the_weighted_sum_of_dice_and_focal(as_bool):
    """The one-pass stage-2 loss equals the two reference losses, value and gradient, for binary targets."""
    torch.manual_seed(0)
    logits = (torch.randn(4, 1, 9, 7) * 4).requires_grad_()
    target = torch.rand(4, 1, 9, 7) > 0.7
    target[1] = False  # a no-target caption: empty mask
    target[2] = True
    fused = segmentation_loss(logits, target if as_bool else target.float(), dice_weight=0.7, focal_weight=1.3,
                              alpha=0.25, gamma=2.0)
    reference = 0.7 * dice_loss(logits, target.float()) + 1.3 * focal_loss(logits, target.float(), 0.25, 2.0)
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-7)
    grad_fused, = torch.autograd.grad(fused, logits)
    grad_reference, = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(grad_fused, grad_reference, rtol=1e-4, atol=1e-8)


def test_segmentation_loss_by_hand_on_two_pixels():
    """Logit 0 on a foreground and a background pixel: p = 0.5 on both."""
    logits = torch.zeros(1, 1, 1, 2)
    target = torch.tensor([[[[True, False]]]])
    # Dice: intersection 0.5, |p| + |t| = 1 + 1 -> 1 - (2 * 0.5 + 1) / (2 + 1) = 1/3
    # Focal: (0.25 * 0.25 * ln 2 + 0.75 * 0.25 * ln 2) / 2 = 0.125 ln 2
    value = segmentation_loss(logits, target, dice_weight=1.0, focal_weight=2.0, alpha=0.25, gamma=2.0)
    assert float(value) == pytest.approx(1 / 3 + 2 * 0.125 * math.log(2), rel=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_segmentation_loss_backward_passes_gradcheck(gamma):
    """Gradients against finite differences (float64), empty and full targets included."""
    torch.manual_seed(1)
    logits = (torch.randn(3, 1, 4, 5, dtype=torch.float64) * 3).requires_grad_()
    target = torch.rand(3, 1, 4, 5) > 0.5
    target[0] = False
    target[2] = True

    def loss(x):
        return segmentation_loss(x, target, dice_weight=0.6, focal_weight=1.7, alpha=0.3, gamma=gamma)

    assert torch.autograd.gradcheck(loss, (logits,), eps=1e-6, atol=1e-8)
