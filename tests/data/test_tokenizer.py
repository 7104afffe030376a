"""Captions become exactly the ids SigLIP2 expects, through a tokenizer saved as SigLIP2's conversion script saves it.

The vocabulary and merges below are written by hand, so the expected ids are
worked out by hand too: "The RED circle" is lower-cased to "the red circle",
Gemma's normalizer turns the spaces into "▁" ("the▁red▁circle"), the merges
give "the" (15) and "▁red" (18), and "▁circle" has no merges, so it stays
characters: ▁ 8, c 11, i 12, r 9, c 11, l 13, e 7. EOS (1) follows, then
pad (0) up to the length. No BOS: SigLIP2 adds none.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from jurassiglip.data.tokenizer import build_word_tokenizer, load_tokenizer, tokenize
from real_format import GEMMA_SPECIALS, siglip2_tokenizer

PIECES = ["t", "h", "e", "▁", "r", "d", "c", "i", "l", "th", "the", "▁r", "▁re", "▁red", "re", "red"]
MERGES = [("t", "h"), ("th", "e"), ("▁", "r"), ("▁r", "e"), ("▁re", "d"), ("r", "e"), ("re", "d")]


def _saved(tmp_path, padding_side: str):
    vocab = {token: i for i, token in enumerate([*GEMMA_SPECIALS, *PIECES])}
    siglip2_tokenizer(vocab, MERGES, padding_side=padding_side).save_pretrained(tmp_path)
    return load_tokenizer(tmp_path)


@pytest.mark.parametrize("saved_padding_side", ["right", "left"])
def test_two_captions_give_the_hand_worked_ids_right_padded_with_a_computed_mask(tmp_path, saved_padding_side):
    tokenizer = _saved(tmp_path, saved_padding_side)
    assert "attention_mask" not in tokenizer(["red"])  # as saved: the tokenizer itself returns no mask

    ids, mask = tokenize(tokenizer, ["The RED circle", "red"], 12)

    assert ids.tolist() == [[15, 18, 8, 11, 12, 9, 11, 13, 7, 1, 0, 0],
                            [20, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[1] * 10 + [0] * 2,
                             [1, 1] + [0] * 10]
    assert ids.dtype == mask.dtype == torch.long


def test_a_long_caption_is_truncated_with_its_eos_kept_last(tmp_path):
    tokenizer = _saved(tmp_path, "right")
    ids, mask = tokenize(tokenizer, ["the " * 10], 6)
    # "the▁" x 10: "the" (15) and "▁" (8) alternate; five tokens fit before EOS
    assert ids.tolist() == [[15, 8, 15, 8, 15, 1]]
    assert mask.tolist() == [[1] * 6]


def test_the_word_tokenizer_of_the_tiny_preset_is_unchanged(tmp_path):
    build_word_tokenizer(["the red circle", "all blue squares"], tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    captions = ["The red circle", "all blue squares left of the red circle", "zebra"]
    # what the tokenizer itself gives, padded on its own (right) side with its own mask
    own = tokenizer(captions, padding="max_length", truncation=True, max_length=5, return_tensors="pt")
    ids, mask = tokenize(tokenizer, captions, 5)
    assert torch.equal(ids, own["input_ids"]) and torch.equal(mask, own["attention_mask"])
