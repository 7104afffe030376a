"""Caption tokenizers: an offline word-level one for the tiny preset, SigLIP2's for the real one.

The tiny text tower is randomly initialised, so its vocabulary can be built
from the training captions themselves (build_manifest does that, with the
`tokenizers` library) and saved beside the manifest. Both kinds are used
through the same transformers tokenizer API, so the model code never knows
which one it has.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from jurassiglip.config import ModelConfig

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"


def build_word_tokenizer(captions: Iterable[str], out_dir: Path, *, min_count: int = 1) -> int:
    """Train a lowercase word-level tokenizer on `captions` and save it to `out_dir`.

    Returns:
        The vocabulary size (specials included).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK, BOS, EOS], min_frequency=min_count)
    tokenizer.train_from_iterator(sorted(captions), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, unk_token=UNK,
                                      bos_token=BOS, eos_token=EOS)
    wrapped.save_pretrained(out_dir)
    return len(wrapped)


def load_tokenizer(name_or_dir: str | Path):
    """A transformers tokenizer from a local folder or a hub id (hub only when online)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(name_or_dir))


def tokenize(tokenizer, captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to `max_len` with truncation, as the prototype did.

    Returns:
        input_ids (B, L) long and attention_mask (B, L) long, L = max_len.
    """
    batch = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_len,
                      return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def caption_tokenizer(model: ModelConfig, tiny_dir: Path):
    """The tokenizer of the active preset: the word tokenizer build_manifest wrote, or SigLIP2's."""
    return load_tokenizer(tiny_dir if model.preset == "tiny" else model.real.text_name)
