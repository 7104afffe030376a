"""Towers on tiny random DINOv3 / SigLIP2 backbones: shapes, token layout, padding, loading."""

import pytest
import torch
from transformers import Siglip2Config, Siglip2Model

from jurassiglip.model.towers import (
    TextTower,
    VisionTower,
    load_pretrained_text,
    load_pretrained_vision,
    tiny_dinov3,
    tiny_siglip2_text,
)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PAD, BOS, EOS = 0, 1, 2


def vision_backbone(num_register_tokens=4, patch_size=16):
    torch.manual_seed(0)
    return tiny_dinov3(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        patch_size=patch_size,
        image_size=64,
        num_register_tokens=num_register_tokens,
    ).eval()


def text_backbone():
    torch.manual_seed(0)
    return tiny_siglip2_text(
        vocab_size=50,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    ).eval()


def images(batch=2, size=64):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("patch_size", [8, 16])
def test_vision_shapes(patch_size):
    tower = VisionTower(vision_backbone(patch_size=patch_size), IMAGENET_MEAN, IMAGENET_STD)
    patches, cls = tower(images())
    n = (64 // patch_size) ** 2
    assert patches.shape == (2, n, 32)
    assert cls.shape == (2, 32)
    assert tower.hidden_size == 32
    assert tower.grid(64) == 64 // patch_size


@pytest.mark.parametrize("registers", [0, 2, 4])
def test_register_count_read_from_config(registers):
    backbone = vision_backbone(num_register_tokens=registers)
    tower = VisionTower(backbone, IMAGENET_MEAN, IMAGENET_STD)
    batch = images()
    with torch.no_grad():
        patches, cls = tower(batch)
        hidden = backbone(pixel_values=tower.normalize(batch)).last_hidden_state  # (B, 1 + R + N, D)
    assert hidden.shape[1] == 1 + registers + 16
    assert patches.shape == (2, 16, 32)  # same N whatever the register count
    torch.testing.assert_close(cls, hidden[:, 0])
    torch.testing.assert_close(patches, hidden[:, 1 + registers :])


def test_normalisation_is_the_processor_formula():
    tower = VisionTower(vision_backbone(), IMAGENET_MEAN, IMAGENET_STD)
    batch = images()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(tower.normalize(batch), (batch.float() / 255 - mean) / std)
    # uint8 and float inputs in 0..255 are the same image
    with torch.no_grad():
        torch.testing.assert_close(tower(batch)[0], tower(batch.float())[0])


def test_vision_rejects_sizes_off_the_patch_grid():
    tower = VisionTower(vision_backbone(), IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tower.grid(60)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tower(images(size=60))


def test_text_shapes_and_masked_mean():
    tower = TextTower(text_backbone(), shared_dim=24)
    ids = torch.tensor([[BOS, 5, 6, 7, EOS, PAD], [BOS, 8, EOS, PAD, PAD, PAD]])
    mask = (ids != PAD).long()
    with torch.no_grad():
        tokens, out_mask, global_feature = tower(ids, mask)
    assert tokens.shape == (2, 6, 24)
    assert global_feature.shape == (2, 24)
    assert torch.equal(out_mask, mask)
    torch.testing.assert_close(global_feature[0], tokens[0, :5].mean(dim=0))
    torch.testing.assert_close(global_feature[1], tokens[1, :3].mean(dim=0))
    assert tower.projection.bias is None


def test_text_padding_does_not_change_outputs():
    """Same caption, different pad lengths and garbage ids under the mask: same real tokens and global."""
    tower = TextTower(text_backbone(), shared_dim=24)
    caption = [BOS, 5, 6, 7, EOS]
    short = torch.tensor([caption + [PAD]])
    long = torch.tensor([caption + [33, 12, 49, 3, 7]])  # garbage ids in masked positions
    short_mask = torch.tensor([[1] * 5 + [0]])
    long_mask = torch.tensor([[1] * 5 + [0] * 5])
    with torch.no_grad():
        tokens_a, _, global_a = tower(short, short_mask)
        tokens_b, _, global_b = tower(long, long_mask)
    torch.testing.assert_close(tokens_a[:, :5], tokens_b[:, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(global_a, global_b, atol=1e-5, rtol=1e-5)


def test_load_pretrained_vision_from_directory(tmp_path):
    backbone = vision_backbone()
    backbone.save_pretrained(tmp_path)
    loaded = load_pretrained_vision(str(tmp_path)).eval()
    batch = images()
    original, reloaded = (VisionTower(b, IMAGENET_MEAN, IMAGENET_STD) for b in (backbone, loaded))
    with torch.no_grad():
        torch.testing.assert_close(original(batch), reloaded(batch))


def full_siglip2():
    text_config = text_backbone().config.to_dict()
    vision_config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_patches=16)
    torch.manual_seed(0)
    return Siglip2Model(Siglip2Config(text_config=text_config, vision_config=vision_config)).eval()


def test_load_pretrained_vision_refuses_other_models(tmp_path):
    full_siglip2().save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="DINOv3ViTModel"):
        load_pretrained_vision(str(tmp_path))


def test_load_pretrained_text_from_text_only_checkpoint(tmp_path):
    backbone = text_backbone()
    backbone.save_pretrained(tmp_path)
    loaded = load_pretrained_text(str(tmp_path)).eval()
    ids = torch.tensor([[BOS, 5, 6, EOS]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, backbone(input_ids=ids).last_hidden_state)


def test_load_pretrained_text_from_full_siglip2_checkpoint(tmp_path):
    """A full SigLIP2 checkpoint (vision + text, like google/siglip2-base-patch16-512) yields its text tower."""
    full = full_siglip2()
    full.save_pretrained(tmp_path)
    loaded = load_pretrained_text(str(tmp_path)).eval()
    expected = full.text_model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
