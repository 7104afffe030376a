"""LoRA adapters on the backbones, through peft.

The prototype adapts both towers with one target list (q_proj, k_proj,
v_proj, o_proj, gate_proj, up_proj, down_proj) and lets each tower take the
names it has: DINOv3 has all of them (gate_proj only with its gated MLP),
SigLIP2's text tower only q_proj/k_proj/v_proj (its others are out_proj, fc1,
fc2). `add_lora` makes that filtering explicit and reports what it adapted.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn


def linear_leaf_names(module: nn.Module) -> set[str]:
    """Last path component of every nn.Linear inside `module` (e.g. 'q_proj')."""
    return {name.rsplit(".", 1)[-1] for name, child in module.named_modules() if isinstance(child, nn.Linear) and name}


def add_lora(
    module: nn.Module, r: int, alpha: float, dropout: float, targets: Sequence[str]
) -> tuple[PeftModel, list[str]]:
    """Wrap `module` with LoRA adapters on the target Linear layers it has.

    peft freezes every base weight, so afterwards only the adapters
    (lora_A / lora_B) require grad. The module is adapted in place and also
    returned wrapped; peft forwards attribute access (e.g. `.config`) to it.

    Args:
        module: the backbone, e.g. a DINOv3ViTModel or a Siglip2TextModel.
        r: adapter rank (prototype: 8).
        alpha: scaling numerator; the adapter output is scaled by alpha / r (prototype: 16).
        dropout: dropout on the adapter input (prototype: 0.0).
        targets: Linear leaf names to adapt; names the module lacks are skipped.

    Returns:
        The peft model and the target names that were adapted, in `targets` order.

    Raises:
        ValueError: if none of the targets is a Linear leaf name of the module.
    """
    present = linear_leaf_names(module)
    adapted = [name for name in dict.fromkeys(targets) if name in present]
    if not adapted:
        raise ValueError(
            f"none of the LoRA targets {list(targets)} is an nn.Linear in {type(module).__name__}; "
            f"its Linear names are {sorted(present)}"
        )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=adapted, bias="none")
    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`; nothing for us to act on.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(module, config)
    return peft_model, adapted


def merge_lora(peft_model: PeftModel) -> nn.Module:
    """Fold the adapters into the base weights and return the plain backbone.

    For inference: the merged module computes the same function without the
    adapter overhead. Replace the tower's backbone with the result, e.g.
    `tower.backbone = merge_lora(tower.backbone)`.
    """
    return peft_model.merge_and_unload()
