"""Caption tokenizers: an offline word-level one for the tiny preset, SigLIP2's for the real one.

The tiny text tower is randomly initialised, so its vocabulary can be built
from the training captions themselves (build_manifest does that, with the
`tokenizers` library) and saved beside the manifest. Both kinds are used
through the same transformers tokenizer API, so the model code never knows
which one it has.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
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
    texts = [_as_tokenized(tokenizer, t) for t in captions]
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token; captions cannot be padded")
    encoded = tokenizer(texts, truncation=True, max_length=max_len, return_attention_mask=False)["input_ids"]
    input_ids = torch.full((len(texts), max_len), int(tokenizer.pad_token_id), dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(texts), max_len), dtype=torch.long)  # (B, L)
    for row, ids in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask


def _as_tokenized(tokenizer, caption: str) -> str:
    """The caption as `tokenize` hands it to the tokenizer: lower-cased when the tokenizer says
    `do_lower_case` (SigLIP2's does, but transformers' GemmaTokenizer does not apply it itself)."""
    return caption.lower() if tokenizer.init_kwargs.get("do_lower_case", False) else caption


@dataclass(frozen=True)
class CaptionReading:
    """What the model reads of one caption, in the terms a warning needs."""

    unknown_words: list[str]  # words (whitespace-separated, as written) holding a token the tokenizer maps to unk
    known_tokens: int         # tokens read (within max_len) that are neither special nor unknown
    truncated: bool           # more than max_len tokens: the rest of the caption is not read


def read_caption(tokenizer, caption: str, max_len: int) -> CaptionReading:
    """Which words of `caption` the tokenizer does not know, and whether it knows any of what is read.

    The same tokenizer call as `tokenize` (lower-casing, special tokens,
    truncation to `max_len`), so it describes exactly what the model gets.
    The tiny preset's word tokenizer maps every word outside the training
    captions to <unk>; SigLIP2's falls back to bytes and knows every word,
    so there "no known token" means a caption that tokenizes to EOS alone.
    Unknown tokens that are only punctuation are not listed (they carry no
    word), but they are not counted as known either.
    """
    text = _as_tokenized(tokenizer, caption)
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    read = tokenizer(text, truncation=True, max_length=max_len, return_offsets_mapping=tokenizer.is_fast)
    ids = read["input_ids"]
    content = [k for k, i in enumerate(ids) if i not in special]
    unknown_at = [k for k in content if ids[k] == tokenizer.unk_token_id]  # none when there is no unk token
    words: list[str] = []
    if tokenizer.is_fast:  # offsets: the unknown tokens' places in the caption
        source = caption if len(caption) == len(text) else text  # offsets index `text`; same length: same places
        for k in unknown_at:
            start, end = read["offset_mapping"][k]
            if all(unicodedata.category(c).startswith("P") for c in text[start:end]):
                continue
            word = _word_around(source, start, end)
            if word not in words:
                words.append(word)
    # one token more than is read tells a cut caption (and never trips the tokenizer's own too-long warning)
    truncated = len(tokenizer(text, truncation=True, max_length=max_len + 1)["input_ids"]) > max_len
    return CaptionReading(unknown_words=words, known_tokens=len(content) - len(unknown_at), truncated=truncated)


def _word_around(text: str, start: int, end: int) -> str:
    """The whitespace-separated word of `text` that holds text[start:end]."""
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    while end < len(text) and not text[end].isspace():
        end += 1
    return text[start:end]


def caption_tokenizer(model: ModelConfig, tiny_dir: Path):
    """The tokenizer of the active preset: the word tokenizer build_manifest wrote, or SigLIP2's."""
    return load_tokenizer(tiny_dir if model.preset == "tiny" else model.real.text_name)
