"""The JurasSigLIP model: DINOv3 vision tokens fused with SigLIP2 text tokens.

Shape legend, used in the `# (...)` comments of every module here:

    B    batch (one image-caption pair per row)
    N    patch tokens per image, N = g^2 = (S / patch)^2
    L    text tokens per caption (padded length)
    D    token width shared by both towers (the vision hidden size; the text
         tokens are projected to it)
    H×W  mask height and width; the model predicts square S×S masks
    S    side of the square input image, in pixels
    g    grid: patches per side, S / patch
    R    DINOv3 register tokens (read from the backbone config)
    E    hidden width of the text backbone, before the projection to D
    h    attention heads; hd = inner_dim / h, the width of one head

Files, in reading order: towers.py (backbones -> tokens), lora.py (adapters),
fusion.py (cross-attention), head.py (the prototype's mask head and the no-target head),
decoder.py (the refinement decoder), model.py (composition), spec.py (what rebuilds a model),
build.py (spec -> model, and back from a checkpoint), checkpoint.py (the checkpoint file format).
"""

from jurassiglip.model.fusion import CrossAttention
from jurassiglip.model.head import NoTargetHead, SegHead
from jurassiglip.model.lora import add_lora, merge_lora
from jurassiglip.model.model import JurasSigLIP
from jurassiglip.model.towers import (
    TextTower,
    VisionTower,
    load_pretrained_text,
    load_pretrained_vision,
    tiny_dinov3,
    tiny_siglip2_text,
)

__all__ = [
    "CrossAttention",
    "JurasSigLIP",
    "NoTargetHead",
    "SegHead",
    "TextTower",
    "VisionTower",
    "add_lora",
    "load_pretrained_text",
    "load_pretrained_vision",
    "merge_lora",
    "tiny_dinov3",
    "tiny_siglip2_text",
]
