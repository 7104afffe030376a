"""LoRA through peft on tiny DINOv3 / SigLIP2 backbones: which layers, what rank, merging."""

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from jurassiglip.model.lora import add_lora, merge_lora
from jurassiglip.model.towers import tiny_dinov3, tiny_siglip2_text

# The prototype's target list (SPEC section 2).
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dinov3(use_gated_mlp=False):
    torch.manual_seed(0)
    return tiny_dinov3(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        patch_size=16,
        image_size=32,
        num_register_tokens=4,
        use_gated_mlp=use_gated_mlp,
    )


def siglip2_text():
    torch.manual_seed(0)
    return tiny_siglip2_text(
        vocab_size=50,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def adapted_leaves(model):
    """Leaf names of the modules peft replaced with LoRA layers."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def plain_linear_leaves(model):
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not any(part.startswith("lora_") for part in name.split("."))
    }


def test_rank_and_alpha_land_in_peft_layers():
    model, _ = add_lora(dinov3(), r=4, alpha=8.0, dropout=0.0, targets=TARGETS)
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    assert layers
    for layer in layers:
        assert layer.r["default"] == 4
        assert layer.lora_alpha["default"] == 8.0
        assert layer.scaling["default"] == pytest.approx(2.0)  # alpha / r
        assert layer.lora_A["default"].weight.shape[0] == 4


def test_siglip2_text_adapts_only_qkv():
    model, adapted = add_lora(siglip2_text(), r=4, alpha=8.0, dropout=0.0, targets=TARGETS)
    assert adapted == ["q_proj", "k_proj", "v_proj"]
    assert adapted_leaves(model) == {"q_proj", "k_proj", "v_proj"}
    assert {"out_proj", "fc1", "fc2"} <= plain_linear_leaves(model)


@pytest.mark.parametrize(
    ("gated", "expected"),
    [
        (False, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
        (True, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ],
)
def test_dinov3_adapts_attention_and_mlp(gated, expected):
    model, adapted = add_lora(dinov3(use_gated_mlp=gated), r=4, alpha=8.0, dropout=0.0, targets=TARGETS)
    assert adapted == expected
    assert adapted_leaves(model) == set(expected)
    # every transformer block is adapted: 2 layers x len(expected)
    assert sum(isinstance(m, LoraLayer) for m in model.modules()) == 2 * len(expected)


def test_only_lora_parameters_require_grad():
    model, _ = add_lora(siglip2_text(), r=4, alpha=8.0, dropout=0.0, targets=TARGETS)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in name for name in trainable)
    assert model.config.hidden_size == 32  # peft forwards attribute access to the backbone


def test_no_matching_target_is_a_clear_error():
    with pytest.raises(ValueError) as error:
        add_lora(siglip2_text(), r=4, alpha=8.0, dropout=0.0, targets=["o_proj", "gate_proj"])
    message = str(error.value)
    assert "['o_proj', 'gate_proj']" in message  # the targets asked for
    assert "out_proj" in message and "fc1" in message  # the names that exist


def test_merged_output_equals_unmerged_output():
    model, _ = add_lora(dinov3(use_gated_mlp=True), r=4, alpha=8.0, dropout=0.0, targets=TARGETS)
    torch.manual_seed(1)
    with torch.no_grad():  # peft starts lora_B at zero (a no-op adapter); make it matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    model.eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base_out = model.get_base_model()
        unmerged = model(pixel_values=pixels).last_hidden_state
        with model.disable_adapter():
            without_adapter = model(pixel_values=pixels).last_hidden_state
        merged_model = merge_lora(model)
        merged = merged_model(pixel_values=pixels).last_hidden_state
    assert not torch.allclose(unmerged, without_adapter, atol=1e-4)  # the adapters do change the output
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert merged_model is base_out
    assert not any(isinstance(m, LoraLayer) for m in merged_model.modules())
