"""Decoders: the prototype's head kept exactly, the refinement decoder's parts, counts and behaviour."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from jurassiglip.config import DecoderConfig, params_from_dict
from jurassiglip.data.tokenizer import load_tokenizer
from jurassiglip.model.build import build_decoder, build_model, with_decoder
from jurassiglip.model.decoder import MixBlock, RefineHead, sincos_2d
from jurassiglip.model.fusion import CrossAttention
from jurassiglip.model.head import SegHead
from jurassiglip.model.spec import PROTOTYPE, ModelSpec

REFINE = DecoderConfig(kind="refine", blocks=2, guide_channels=16, guide_to_grid=False)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def conv(fan_in: int, fan_out: int, k: int) -> int:
    return fan_in * fan_out * k * k + fan_out


def test_prototype_decoder_at_real_size_is_spec_section_2():
    """cross-attention (384 -> 768, 4 heads) + per-patch MLP (384 -> 512 -> 1) = 1,378,817 (SPEC §2)."""
    head = build_decoder(PROTOTYPE, dim=384, hidden=512)
    assert isinstance(head, SegHead)
    assert count(CrossAttention(dim=384, inner_dim=768, heads=4)) + count(head) == 1_378_817


def test_refine_decoder_parameter_count_by_hand():
    dim, hidden, channels = 64, 128, 16
    block = 2 * dim + linear(dim, dim // 2) + conv(dim // 2, dim // 2, 3) + linear(dim // 2, dim)  # LN, down, conv, up
    mlp = linear(dim, hidden) + linear(hidden, 1)
    guide = (conv(3, channels, 4) + linear(dim, 2 * channels) + linear(dim, channels)
             + conv(2 * channels + 1, channels, 1) + conv(channels, 1, 3))
    assert (block, mlp, guide) == (13_568, 8_449, 4_593)
    head = build_decoder(REFINE, dim=dim, hidden=hidden)
    assert count(head) == 2 * block + mlp + guide == 40_178
    assert count(build_decoder(dataclasses.replace(REFINE, guide_channels=0), dim=dim, hidden=hidden)) == 2 * block + mlp
    outline = conv(channels, 2 * channels, 3) + conv(2 * channels, 2 * channels, 3) + linear(2 * channels, dim)
    assert outline == 16_000
    with_outline = build_decoder(dataclasses.replace(REFINE, guide_to_grid=True), dim=dim, hidden=hidden)
    assert count(with_outline) == 2 * block + mlp + guide + outline


def test_position_code_tells_every_patch_apart_and_is_bounded():
    code = sincos_2d(16, 8)  # (D, g, g)
    assert code.shape == (16, 8, 8)
    assert code.abs().max() <= 1.0
    flat = code.flatten(1).T  # (g*g, D)
    assert torch.cdist(flat, flat).add(torch.eye(64)).min() > 1e-3  # no two positions share a code
    torch.testing.assert_close(code[:8, 3, :], code[:8, 3, :1].expand(8, 8))  # first half: the row only
    torch.testing.assert_close(code[8:, :, 5], code[8:, :1, 5].expand(8, 8))  # second half: the column only


def test_mix_block_starts_as_identity_and_mixes_neighbours_once_trained():
    torch.manual_seed(0)
    block = MixBlock(dim=8, width=4)
    tokens = torch.randn(2, 16, 8)
    torch.testing.assert_close(block(tokens, grid=4), tokens)
    torch.nn.init.normal_(block.up.weight)
    changed = tokens.clone()
    changed[:, 5] += torch.randn(8)  # patch (1, 1)
    delta = (block(changed, grid=4) - block(tokens, grid=4)).abs().sum(-1)[0].reshape(4, 4)
    assert (delta[:3, :3] > 0).all()  # its 3x3 neighbourhood sees the change
    assert (delta[3, :] == 0).all() and (delta[:, 3] == 0).all()  # nothing further away does


def test_image_guide_reads_the_image_and_the_caption_once_trained():
    torch.manual_seed(0)
    head = RefineHead(dim=8, hidden=16, blocks=1, guide_channels=4)
    for layer in (head.guide.out, head.guide.film):
        torch.nn.init.normal_(layer.weight)
    tokens, text = torch.randn(1, 16, 8), torch.randn(1, 3, 8)
    mask = torch.ones(1, 3, dtype=torch.bool)
    images = torch.randint(0, 256, (1, 3, 32, 32)).float()
    logits, refined = head.decode(tokens, 4, 32, images, text, mask)
    assert logits.shape == (1, 1, 32, 32) and refined.shape == (1, 16, 8)
    assert not torch.equal(head.decode(tokens, 4, 32, 255 - images, text, mask)[0], logits)
    assert not torch.equal(head.decode(tokens, 4, 32, images, -text, mask)[0], logits)
    with pytest.raises(ValueError, match="needs the images"):
        head.decode(tokens, 4, 32, None, text, mask)


@pytest.mark.parametrize("image_size, grid", [(32, 4), (64, 4)])  # the outline grid is S/8: pooled when coarser
def test_outline_features_reach_every_patch_of_the_grid_once_trained(image_size, grid):
    torch.manual_seed(0)
    head = RefineHead(dim=8, hidden=16, blocks=0, guide_channels=4, guide_to_grid=True)
    tokens, text = torch.randn(1, grid * grid, 8), torch.randn(1, 3, 8)
    mask = torch.ones(1, 3, dtype=torch.bool)
    images = torch.randint(0, 256, (1, 3, image_size, image_size)).float()
    start = head.decode(tokens, grid, image_size, images, text, mask)[1]
    torch.testing.assert_close(start, tokens + sincos_2d(8, grid).flatten(1).T)  # adds nothing untrained
    torch.nn.init.normal_(head.guide.to_tokens.weight)
    trained = head.decode(tokens, grid, image_size, images, text, mask)[1]
    changed = head.decode(tokens, grid, image_size, 255 - images, text, mask)[1]
    assert ((trained - changed).abs().sum(-1) > 0).all()  # every patch reads the image


@pytest.mark.parametrize("decoder", [PROTOTYPE, REFINE], ids=["prototype", "refine"])
def test_each_decoder_builds_at_tiny_size_and_decodes(decoder, micro_params, micro_data):
    params = params_from_dict(micro_params)
    spec = dataclasses.replace(ModelSpec.from_params(params, load_tokenizer(micro_data / "tokenizer")), decoder=decoder)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    size, grid, dim = spec.arch.image_size, model.grid, spec.arch.shared_dim
    patches, tokens = torch.randn(3, grid * grid, dim), torch.randn(3, 5, dim)
    mask = torch.ones(3, 5, dtype=torch.bool)
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        logits, no_target = model.decode(patches, tokens, mask, images)
    assert logits.shape == (3, 1, size, size) and no_target.shape == (3,)
    assert isinstance(model.head, SegHead if decoder == PROTOTYPE else RefineHead)


def test_stage_two_swaps_in_the_chosen_decoder_and_keeps_a_matching_one(micro_params, micro_data):
    params = params_from_dict(micro_params)
    spec = dataclasses.replace(ModelSpec.from_params(params, load_tokenizer(micro_data / "tokenizer")),
                               decoder=PROTOTYPE)
    model = build_model(spec)
    head = model.head
    assert with_decoder(model, spec, PROTOTYPE) == spec and model.head is head  # nothing to do
    assert with_decoder(model, spec, dataclasses.replace(REFINE, kind="prototype")) == spec  # -S ...kind=prototype
    assert model.head is head
    refined = with_decoder(model, spec, REFINE)
    assert refined.decoder == REFINE and isinstance(model.head, RefineHead)
