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


def load_tokenizer(name_or_dir: str | Path, *, revision: str | None = None, local_files_only: bool = False):
    """A transformers tokenizer from a local folder or a hub id (the hub only when online and allowed)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(name_or_dir), revision=revision, local_files_only=local_files_only)


def tokenize(tokenizer, captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> right-padded ids and the mask of real tokens, whatever the tokenizer's own settings.

    Both tokenizers go through here, so training and inference cannot differ:
    - lower-cased first when the tokenizer says `do_lower_case` (SigLIP2's
      does, but transformers' GemmaTokenizer does not apply it itself);
    - the tokenizer's special tokens added as it is configured (SigLIP2: EOS,
      no BOS), truncated to `max_len` with EOS kept;
    - padded on the right with the pad id, whatever `padding_side` the
      loaded tokenizer has: SigLIP's text positions are absolute, so left
      padding would silently shift every caption;
    - the mask computed here from the pad positions (SigLIP2's tokenizer
      returns none, on purpose): 1 up to the last real token, EOS included.

    Returns:
        input_ids (B, L) long and attention_mask (B, L) long, L = max_len.
    """
    texts = list(captions)
    if tokenizer.init_kwargs.get("do_lower_case", False):
        texts = [t.lower() for t in texts]
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token; captions cannot be padded")
    encoded = tokenizer(texts, truncation=True, max_length=max_len, return_attention_mask=False)["input_ids"]
    input_ids = torch.full((len(texts), max_len), int(tokenizer.pad_token_id), dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(texts), max_len), dtype=torch.long)  # (B, L)
    for row, ids in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask


def caption_tokenizer(model: ModelConfig, tiny_dir: Path):
    """The tokenizer of the active preset: the word tokenizer build_manifest wrote, or SigLIP2's."""
    return load_tokenizer(tiny_dir if model.preset == "tiny" else model.real.text_name)
