"""The feature cache stores only the text positions some cached caption uses, and stage 2 cannot tell.

What a user relies on: finetuning on the cache gives the same masks and
losses as finetuning on live features (finetune.cache_features=false), to
fp16 precision, while the text files hold L' positions (the longest cached
caption), not text_max_len.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jurassiglip.config import params_from_dict
from jurassiglip.data.datasets import CaptionDataset, batch_loader
from jurassiglip.data.manifest import Manifest
from jurassiglip.data.tokenizer import load_tokenizer, tokenize
from jurassiglip.training.features import CachedSegDataset, build_cache, text_length
from jurassiglip.training.seg_finetune import cached_loss_fn, live_loss_fn, train_head_only
from jurassiglip.model.build import build_model
from jurassiglip.model.spec import ModelSpec


@pytest.fixture(scope="module")
def setup(micro_data, micro_params):
    params = params_from_dict(micro_params)
    manifest = Manifest.load(micro_data / "manifest")
    tokenizer = load_tokenizer(micro_data / "tokenizer")
    ids, mask = tokenize(tokenizer, manifest.samples["sentence"].tolist(), params.model.arch.text_max_len)
    torch.manual_seed(0)
    model = build_model(ModelSpec.from_params(params, tokenizer))
    model.trainable_for_finetune()
    train_head_only(model)
    return params, manifest, ids, mask, model


def caption_lengths(mask: torch.Tensor) -> np.ndarray:
    """(n, L) attention masks -> (n,) last real position + 1, by a loop (the reference for text_length)."""
    return np.array([max((i + 1 for i, real in enumerate(row.tolist()) if real), default=0) for row in mask])


def test_text_length_is_the_end_of_the_longest_caption():
    mask = torch.tensor([[1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [1, 0, 1, 1, 0, 0],   # a hole: the last real position still counts
                         [0, 0, 0, 0, 0, 0]])  # no real token
    assert text_length(mask) == 4
    assert text_length(mask[3:]) == 1  # at least one position, so the arrays keep a text axis
    assert text_length(mask[:0]) == 1
    assert text_length(torch.ones(2, 6, dtype=torch.long)) == 6


def test_trimmed_cache_gives_the_live_stage2_outputs(setup, tmp_path):
    """Cache of captions shorter than text_max_len: L' positions stored, decode and loss as on live features."""
    params, manifest, ids, mask, model = setup
    samples = manifest.samples
    cached = samples.loc[samples["split"].isin(["train", "val"]), "sample_id"].to_numpy().copy()
    lengths = caption_lengths(mask[cached])
    # leave out the longest captions, so the trim is visible even if one caption fills text_max_len
    cached = cached[lengths < lengths.max()] if lengths.max() > lengths.min() else cached
    expected_length = int(caption_lengths(mask[cached]).max())
    assert expected_length < mask.shape[1]  # the micro set's captions are shorter than the padding

    cache = build_cache(model, manifest, ids, mask, cached, tmp_path / "features", batch_size=4, fingerprint="x")
    meta = json.loads((tmp_path / "features" / "meta.json").read_text())
    assert cache.text.shape == (len(cached), expected_length, model.vision.hidden_size)
    assert cache.text_mask.shape == (len(cached), expected_length)
    assert meta["text_length"] == expected_length and meta["text_max_len"] == mask.shape[1]
    assert meta["text_shape"] == list(cache.text.shape)

    # a batch with the longest cached caption and some short ones, in a shuffled order
    longest = cached[np.argmax(caption_lengths(mask[cached]))]
    batch_ids = np.random.default_rng(0).permutation(np.unique(np.r_[cached[:11], longest]))
    train_head_only(model)
    from_cache = next(iter(batch_loader(CachedSegDataset(manifest, cache), batch_size=len(batch_ids),
                                        sampler=batch_ids)))
    live = next(iter(batch_loader(CaptionDataset(manifest, ids, mask, with_target=True), batch_size=len(batch_ids),
                                  sampler=batch_ids)))
    assert from_cache["text"].shape == (len(batch_ids), expected_length, model.vision.hidden_size)
    assert torch.equal(from_cache["text_mask"], live["attention_mask"][:, :expected_length].bool())
    assert not live["attention_mask"][:, expected_length:].any()  # what was cut is padding only
    assert torch.equal(from_cache["image"], live["image"])  # what an image-guided decoder reads, from the manifest

    with torch.no_grad():
        patches, _ = model.encode_image(live["image"])  # (B, N, D)
        tokens, token_mask, _ = model.encode_text(live["input_ids"], live["attention_mask"])  # (B, L, D), (B, L)
        live_logits, live_nt = model.decode(patches, tokens, token_mask, live["image"])  # (B, 1, S, S), (B,)
        # the same fp16 features, untrimmed: only the trim differs, so the outputs agree to float32 rounding
        full_logits, full_nt = model.decode(patches.half(), tokens.half(), token_mask, live["image"])
        logits, nt = model.decode(from_cache["patches"], from_cache["text"], from_cache["text_mask"],
                                  from_cache["image"])
    scale = float(live_logits.abs().max())
    assert float((logits - full_logits).abs().max()) <= 1e-5 * scale
    assert float((nt - full_nt).abs().max()) <= 1e-5 * max(float(full_nt.abs().max()), 1.0)
    # against live fp32 features: fp16 storage precision (11 significant bits)
    assert float((logits - live_logits).abs().max()) <= 2e-3 * scale
    assert float((nt - live_nt).abs().max()) <= 2e-3 * max(float(live_nt.abs().max()), 1.0)
    cached_loss = cached_loss_fn(model, params.finetune)(from_cache)
    live_loss = live_loss_fn(model, params.finetune)(live)
    assert float(cached_loss.detach()) == pytest.approx(float(live_loss.detach()), rel=1e-3)
