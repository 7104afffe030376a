"""JurasSigLIP composed from tiny random towers: shapes, wiring, trainable sets, logit scale."""

import math

import pytest
import torch

from peft.tuners.lora import LoraLayer

from jurassiglip.training.losses import clip_loss, sigmoid_loss
from jurassiglip.model import (
    CrossAttention,
    JurasSigLIP,
    NoTargetHead,
    SegHead,
    TextTower,
    VisionTower,
    add_lora,
    tiny_dinov3,
    tiny_siglip2_text,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD, BOS, EOS = 0, 1, 2
SIZE, PATCH, WIDTH = 64, 16, 32
LOG_100 = math.log(100)


def build(lora=False, logit_scale_init=math.log(1 / 0.07)):
    torch.manual_seed(0)
    vision = tiny_dinov3(
        hidden_size=WIDTH,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        patch_size=PATCH,
        image_size=SIZE,
        num_register_tokens=4,
    )
    text = tiny_siglip2_text(
        vocab_size=50,
        hidden_size=24,  # differs from WIDTH so the projection does real work
        num_layers=2,
        num_heads=4,
        intermediate_size=48,
        max_position_embeddings=16,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    if lora:
        vision, _ = add_lora(vision, r=4, alpha=8.0, dropout=0.0, targets=TARGETS)
        text, _ = add_lora(text, r=4, alpha=8.0, dropout=0.0, targets=TARGETS)
    return JurasSigLIP(
        vision=VisionTower(vision, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        text=TextTower(text, shared_dim=WIDTH),
        fusion=CrossAttention(dim=WIDTH, inner_dim=64, heads=4),
        head=SegHead(dim=WIDTH, hidden=48),
        no_target=NoTargetHead(dim=WIDTH, hidden=48),
        logit_scale_init=logit_scale_init,
        logit_scale_max=LOG_100,
        image_size=SIZE,
    ).eval()


def batch():
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    ids = torch.tensor([[BOS, 5, 6, 7, EOS, PAD], [BOS, 8, EOS, PAD, PAD, PAD]])
    return images, ids, (ids != PAD).long()


def test_fusion_and_head_at_prototype_sizes_have_1378817_parameters():
    """SPEC section 2: cross-attention (384 -> 768, 4 heads) + head (384 -> 512 -> 1) = 1,378,817."""
    fusion = CrossAttention(dim=384, inner_dim=768, heads=4)
    head = SegHead(dim=384, hidden=512)
    count = sum(p.numel() for module in (fusion, head) for p in module.parameters() if p.requires_grad)
    assert count == 1_378_817


def test_shapes_through_everything():
    model = build()
    images, ids, mask = batch()
    with torch.no_grad():
        patches, cls = model.encode_image(images)
        tokens, out_mask, global_feature = model.encode_text(ids, mask)
        logits = model(images, ids, mask)
        image_emb, text_emb = model.contrastive_features(images, ids, mask)
    n = (SIZE // PATCH) ** 2
    assert patches.shape == (2, n, WIDTH) and cls.shape == (2, WIDTH)
    assert tokens.shape == (2, 6, WIDTH) and out_mask.shape == (2, 6) and global_feature.shape == (2, WIDTH)
    assert logits.shape == (2, 1, SIZE, SIZE)
    assert image_emb.shape == text_emb.shape == (2, WIDTH)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(2))
    assert model.grid == SIZE // PATCH


def test_segment_on_cached_fp16_features_matches_forward():
    model = build()
    images, ids, mask = batch()
    with torch.no_grad():
        live = model(images, ids, mask)
        patches, _ = model.encode_image(images)
        tokens, out_mask, _ = model.encode_text(ids, mask)
        cached = model.segment(patches.half(), tokens.half(), out_mask)
    assert cached.dtype == torch.float32
    torch.testing.assert_close(cached, live, atol=1e-2, rtol=1e-2)


def test_padding_does_not_change_logits():
    model = build()
    images, _, _ = batch()
    caption = [BOS, 5, 6, 7, EOS]
    short = torch.tensor([caption + [PAD]] * 2)
    long = torch.tensor([caption + [44, 3, 17, 9, 21]] * 2)  # garbage ids under the mask
    with torch.no_grad():
        a = model(images, short, torch.tensor([[1] * 5 + [0]] * 2))
        b = model(images, long, torch.tensor([[1] * 5 + [0] * 5] * 2))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_logit_scale_is_clamped():
    assert build().logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    high = build(logit_scale_init=10.0)
    assert high.logit_scale.item() == pytest.approx(LOG_100)
    high.clamp_logit_scale_()
    assert high.logit_scale_raw.item() == pytest.approx(LOG_100)
    assert build(logit_scale_init=-1.0).logit_scale.item() == 0.0


def test_trainable_for_pretrain():
    model = build(lora=True)
    params = model.trainable_for_pretrain()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert "logit_scale_raw" in trainable and "text.projection.weight" in trainable
    assert any(name.startswith("vision.") and "lora_" in name for name in trainable)
    assert any(name.startswith("text.backbone") and "lora_" in name for name in trainable)
    others = trainable - {"logit_scale_raw", "text.projection.weight"}
    assert all("lora_" in name for name in others)  # no base backbone weight, no fusion, no head

    images, ids, mask = batch()
    image_emb, text_emb = model.train().contrastive_features(images, ids, mask)
    clip_loss(image_emb, text_emb, model.logit_scale).backward()
    # the scale's gradient is the loss's slope in it (a central difference; the loss computes in float32)
    image, text, raw = image_emb.detach(), text_emb.detach(), model.logit_scale_raw.detach()
    slope = (clip_loss(image, text, raw + 1e-2) - clip_loss(image, text, raw - 1e-2)) / 2e-2
    assert model.logit_scale_raw.grad.item() == pytest.approx(slope.item(), rel=1e-3)
    assert model.text.projection.weight.grad.abs().sum() > 0  # zero would mean the text path is cut off
    assert all(p.grad is None for p in model.fusion.parameters())
    assert not model.logit_bias.requires_grad  # the CLIP loss has no bias


def test_trainable_for_pretrain_with_sigmoid_bias():
    model = build(lora=True)
    params = model.trainable_for_pretrain(with_logit_bias=True)
    assert any(p is model.logit_bias for p in params) and model.logit_bias.requires_grad
    assert model.logit_bias.item() == -10.0  # SigLIP's initialisation
    images, ids, mask = batch()
    image_emb, text_emb = model.contrastive_features(images, ids, mask)
    sigmoid_loss(image_emb, text_emb, model.logit_scale, model.logit_bias).backward()
    image, text = image_emb.detach(), text_emb.detach()
    scale, bias = model.logit_scale.detach(), model.logit_bias.detach()
    slope = (sigmoid_loss(image, text, scale, bias + 1e-2) - sigmoid_loss(image, text, scale, bias - 1e-2)) / 2e-2
    assert model.logit_bias.grad.item() == pytest.approx(slope.item(), rel=1e-3)


def test_merge_lora_keeps_the_function():
    model = build(lora=True)
    with torch.no_grad():  # peft starts lora_B at zero; make the adapters matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    images, ids, mask = batch()
    with torch.no_grad():
        before = model(images, ids, mask), model.contrastive_features(images, ids, mask)
        model.merge_lora()
        after = model(images, ids, mask), model.contrastive_features(images, ids, mask)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)


def test_trainable_for_finetune():
    model = build(lora=True)
    model.trainable_for_pretrain()
    params = model.trainable_for_finetune()
    expected = {id(p) for module in (model.fusion, model.head, model.no_target) for p in module.parameters()}
    assert {id(p) for p in params} == expected
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected
    without_head = model.trainable_for_finetune(with_no_target=False)  # no_target_weight 0: head stays frozen
    assert {id(p) for p in without_head} == expected - {id(p) for p in model.no_target.parameters()}


def test_tower_widths_must_agree():
    torch.manual_seed(0)
    vision = VisionTower(
        tiny_dinov3(
            hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, patch_size=16, image_size=64,
            num_register_tokens=4,
        ),
        [0.5] * 3,
        [0.5] * 3,
    )
    text = TextTower(
        tiny_siglip2_text(
            vocab_size=50, hidden_size=24, num_layers=1, num_heads=4, intermediate_size=48,
            max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
        shared_dim=16,
    )
    with pytest.raises(ValueError, match="vision width 32"):
        JurasSigLIP(vision, text, CrossAttention(32, 64, 4), SegHead(32, 48), NoTargetHead(32, 48), 2.66, LOG_100, 64)
