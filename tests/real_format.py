"""Real-format fixtures: tiny models and files laid out exactly as the real ones, built offline in seconds.

- `save_dinov3`: a tiny `DINOv3ViTModel` (gated MLP and 4 registers, as
  ViT-S/16+) saved with `save_pretrained`, as the hub repo
  facebook/dinov3-vits16plus-pretrain-lvd1689m holds it.
- `save_siglip2`: a tiny full `Siglip2Model` (vision + text) saved the same
  way, with a SigLIP2-format tokenizer beside it, as the hub repo
  google/siglip2-base-patch16-512 holds them.
- `siglip2_tokenizer`: transformers' Gemma tokenizer class with the settings
  SigLIP2's conversion script saves (`add_bos_token=False`,
  `add_eos_token=True`, `padding_side="right"`, `do_lower_case=True`,
  `model_input_names=["input_ids"]`: no attention mask returned) over a BPE
  vocabulary trained offline with the `tokenizers` library. Gemma's special
  ids: pad 0, eos 1, bos 2, unk 3, mask 4.
- `write_grefcoco`: gRefCOCO-format files (refs list, COCO instances,
  images) from the synthetic generator, with gRefCOCO's split names.
"""

from __future__ import annotations

import json
from pathlib import Path

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0..4, as in Gemma's vocabulary


def siglip2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], *, padding_side: str = "right"):
    """A Gemma tokenizer with SigLIP2's saved settings over the given BPE vocabulary and merges."""
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=False, add_eos_token=True,
                          padding_side=padding_side, do_lower_case=True, model_input_names=["input_ids"])


def train_siglip2_tokenizer(captions: list[str], vocab_size: int = 400):
    """A SigLIP2-format tokenizer whose BPE vocabulary is trained on `captions` (lower-cased, as SigLIP2's)."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")  # Gemma's: spaces become ▁, no prefix space
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=GEMMA_SPECIALS, show_progress=False)
    bpe.train_from_iterator(sorted({c.lower() for c in captions}), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return siglip2_tokenizer(model["vocab"], merges)


def save_dinov3(folder: Path, *, hidden: int = 32, image_size: int = 64) -> Path:
    """A tiny DINOv3 ViT (patch 16, 4 registers, gated MLP) saved in the hub layout."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                             num_attention_heads=4, patch_size=16, image_size=image_size, num_register_tokens=4,
                             use_gated_mlp=True)
    DINOv3ViTModel(config).save_pretrained(folder)
    return folder


def save_siglip2(folder: Path, captions: list[str], *, hidden: int = 48, max_len: int = 64) -> Path:
    """A tiny full SigLIP2 (vision + text towers) and its SigLIP2-format tokenizer, saved in the hub layout."""
    import torch
    from transformers import Siglip2Config, Siglip2Model

    tokenizer = train_siglip2_tokenizer(captions)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=max_len, pad_token_id=0, eos_token_id=1,
                bos_token_id=2)
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=4,
                  patch_size=16, num_patches=16)
    Siglip2Model(Siglip2Config(text_config=text, vision_config=vision)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_grefcoco(folder: Path, n_images: dict[str, int], *, seed: int = 0, max_side: int = 128) -> Path:
    """gRefCOCO-format files in `folder` (grefs(unc).json, instances.json, images/) for the given splits."""
    from jurassiglip.data.synthetic import generate

    generate(folder, seed=seed, n_images=n_images, min_objects=2, max_objects=4, min_side=64, max_side=max_side,
             refs_per_image=4, no_target_share=0.15, novel_combos=["red triangle"], rle_share=0.3)
    return folder


def first_release(grefs_path: Path, out_path: Path) -> Path:
    """The refs file without its testA/testB refs, as gRefCOCO's first release shipped it."""
    refs = json.loads(grefs_path.read_text())
    out_path.write_text(json.dumps([r for r in refs if r["split"] not in ("testA", "testB")]))
    return out_path
