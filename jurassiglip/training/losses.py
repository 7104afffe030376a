"""Training losses: contrastive alignment (stage 1) and mask losses (stage 2).

Pure functions on tensors; every knob is an argument the caller passes from
params.yaml. Losses are computed in float32 whatever the input dtype, so they
stay stable under bf16 autocast.

- `clip_loss`: symmetric softmax cross-entropy over the batch (the prototype's
  stage 1 loss), with an optional fix for several captions of one image.
- `sigmoid_loss`: SigLIP's pairwise sigmoid loss, an alternative for stage 1.
- `dice_loss` + `focal_loss`: the prototype's stage 2 loss, 1 x Dice + 1 x Focal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _same_image(image_ids: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """(B, B) bool: pair i and pair j show the same image (the diagonal when ids are absent)."""
    if image_ids is None:
        return torch.eye(batch, dtype=torch.bool, device=device)
    if image_ids.shape != (batch,):
        raise ValueError(f"image_ids must have shape ({batch},), got {tuple(image_ids.shape)}")
    return image_ids[:, None] == image_ids[None, :]  # (B, B)


def _similarity(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """exp(logit_scale) * cosine similarities, rows = images, columns = captions: (B, B)."""
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"need two (B, D) embeddings of one shape, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=image_emb.device).exp()
    return scale * image_emb.float() @ text_emb.float().T  # (B, B)


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric CLIP cross-entropy between matched image and caption embeddings.

    Row i of both inputs is one (image, caption) pair. Without `image_ids`
    caption i is the only positive of image i (standard CLIP). With
    `image_ids`, every pair of the same image is a positive: the target of an
    image row (and of a caption column) is spread uniformly over the captions
    (images) of the same image, so two captions of one image are not pushed
    apart as if they were negatives. All-distinct ids give the standard loss.

    The fix only matters when the rows of one image carry *different* image
    embeddings (augmentation, dropout, DINOv3's train-mode RoPE jitter): if
    they are identical, the duplicate columns already share the softmax mass
    and soft and hard targets give the same value and gradients. (In
    `sigmoid_loss` the ids always matter: there a same-image pair labelled -1
    is a plain contradiction.)

    Args:
        image_emb: (B, D) L2-normalised image embeddings.
        text_emb: (B, D) L2-normalised caption embeddings.
        logit_scale: scalar in log space; logits = exp(logit_scale) * cosine.
        image_ids: optional (B,) image identity of each pair.

    Returns:
        Scalar: mean of the image->text and text->image cross-entropies.
    """
    logits = _similarity(image_emb, text_emb, logit_scale)  # (B, B)
    positives = _same_image(image_ids, logits.shape[0], logits.device).float()  # (B, B), symmetric
    targets = positives / positives.sum(dim=1, keepdim=True)  # (B, B), rows sum to 1
    image_to_text = F.cross_entropy(logits, targets)
    text_to_image = F.cross_entropy(logits.T, targets)  # targets is symmetric, so it serves the columns too
    return (image_to_text + text_to_image) / 2


def sigmoid_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP pairwise sigmoid loss.

    Every (image, caption) pair of the batch is an independent binary
    decision: label +1 when both come from the same image (the diagonal when
    `image_ids` is None), -1 otherwise; loss = -log sigmoid(label * (exp(scale)
    * cosine + bias)). Normalisation follows the SigLIP paper: summed over all
    B x B pairs and divided by B (one image's worth of decisions per row), not
    averaged over pairs; SigLIP's initialisation (scale log 10, bias -10) is
    tuned for that form.

    Args:
        image_emb: (B, D) L2-normalised image embeddings.
        text_emb: (B, D) L2-normalised caption embeddings.
        logit_scale: scalar in log space.
        logit_bias: scalar added to every logit (learnable in SigLIP).
        image_ids: optional (B,) image identity of each pair.

    Returns:
        Scalar loss.
    """
    logits = _similarity(image_emb, text_emb, logit_scale)  # (B, B)
    logits = logits + torch.as_tensor(logit_bias, dtype=torch.float32, device=logits.device)  # (B, B)
    labels = _same_image(image_ids, logits.shape[0], logits.device).float() * 2 - 1  # (B, B), +1 / -1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss on sigmoid probabilities, mean over the batch.

    Per sample: 1 - (2 |p * t| + 1) / (|p| + |t| + 1), sums over all pixels.
    The smoothing of 1 in numerator and denominator makes an empty target
    with an empty prediction a perfect score (loss 0) instead of 0 / 0, which
    matters because no-target captions have empty masks.

    Args:
        logits: (B, 1, H, W) mask logits.
        target: (B, 1, H, W) float mask in [0, 1].

    Returns:
        Scalar loss in [0, 1).
    """
    probs = torch.sigmoid(logits.float()).flatten(1)  # (B, H*W)
    target = target.float().flatten(1)  # (B, H*W)
    intersection = (probs * target).sum(dim=1)  # (B,)
    total = probs.sum(dim=1) + target.sum(dim=1)  # (B,)
    dice = (2 * intersection + 1) / (total + 1)  # (B,)
    return (1 - dice).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet, Lin et al. 2017), mean over pixels.

    Per pixel: -alpha_t (1 - p_t)^gamma log(p_t), where p_t is the predicted
    probability of the true class and alpha_t = alpha on foreground, 1 - alpha
    on background. The defaults, alpha 0.25 and gamma 2, are RetinaNet's and
    the prototype's; callers pass them from params anyway.

    Args:
        logits: (B, 1, H, W) mask logits.
        target: (B, 1, H, W) float mask in [0, 1].
        alpha: foreground weight.
        gamma: focusing exponent; 0 gives alpha-weighted cross-entropy.

    Returns:
        Scalar loss.
    """
    logits = logits.float()
    target = target.float()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # (B, 1, H, W) = -log p_t
    probs = torch.sigmoid(logits)  # (B, 1, H, W)
    p_t = probs * target + (1 - probs) * (1 - target)  # (B, 1, H, W)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)  # (B, 1, H, W)
    return (alpha_t * (1 - p_t) ** gamma * cross_entropy).mean()


def no_target_loss(logits: torch.Tensor, no_target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the no-target head: logits (B,), no_target (B,) 1 for a caption that names nothing."""
    return F.binary_cross_entropy_with_logits(logits.float(), no_target.float())


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, *, dice_weight: float, focal_weight: float,
                      alpha: float, gamma: float) -> torch.Tensor:
    """Stage-2 loss: dice_weight x Dice + focal_weight x Focal (the prototype used 1, 1, alpha 0.25, gamma 2).

    The same value as `dice_weight * dice_loss + focal_weight * focal_loss`
    for a binary target, computed in one pass that shares its per-pixel terms:
    with s = +x on foreground and -x on background, log p_t = logsigmoid(s),
    so cross-entropy, p_t and the Dice intersection all come from one
    logsigmoid. About half the per-pixel work of calling the two losses,
    which matters because per-pixel ops are a third of a tiny cached
    stage-2 step (benchmarks R5). (A hand-written backward that recomputes
    the logsigmoid was measured slower than autograd keeping it.)

    Args:
        logits: (B, 1, H, W) mask logits.
        target: (B, 1, H, W) binary target, bool or 0/1 float (all zeros for a no-target caption).

    Returns:
        Scalar loss, float32 (float64 for float64 logits).
    """
    logits = (logits if logits.dtype == torch.float64 else logits.float()).flatten(1)  # (B, H*W)
    foreground = target.flatten(1).to(logits.dtype)  # (B, H*W), 0 or 1
    log_p_t = F.logsigmoid(logits * (2 * foreground - 1))  # (B, H*W), log-probability of the true class
    p_t = log_p_t.exp()
    alpha_t = (1 - alpha) + (2 * alpha - 1) * foreground  # alpha on foreground, 1 - alpha on background
    focal = -(alpha_t * (1 - p_t) ** gamma * log_p_t).mean()
    intersection = (p_t * foreground).sum(dim=1)  # = sum of p over foreground pixels, (B,)
    total = torch.sigmoid(logits).sum(dim=1) + foreground.sum(dim=1)  # (B,)
    dice = (1 - (2 * intersection + 1) / (total + 1)).mean()
    return dice_weight * dice + focal_weight * focal
