"""Both training stages learn: tests a broken optimizer, schedule, freeze or loss would fail.

Each stage's recipe (its objective, built as the stage builds it, trained by
the real loop) runs on the micro manifest for a few seconds, then the model
is checked for what its stage is for:

- stage 2 (seg_finetune): the validation loss ends clearly below where it
  started, and on the training images the model beats the shuffled-caption
  baseline (the same model, captions permuted) and the text-blind union of
  all objects: it uses the text;
- stage 1 (contrastive_pretrain): the validation loss ends below the loss of
  a model that cannot tell the batch's pairs apart (log of the batch size),
  and on the training images a caption finds its own image among all of them
  (retrieval) well above chance, where it was at chance before training.

Params are the repository's (lr, schedule, loss weights) on the micro
config, with more epochs than the end-to-end tests use and patience above
the epochs, so that the run length does not depend on early stopping. The
margins are about half of what these runs reach on CPU (numbers in the
report of issue 15), so float noise cannot flip them, but a model that
stopped learning does.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from jurassiglip.config import params_from_dict
from jurassiglip.data.manifest import Manifest
from jurassiglip.data.tokenizer import load_tokenizer, tokenize
from jurassiglip.inference.decision import Decision
from jurassiglip.inference.evaluate import evaluate_split, split_metrics
from jurassiglip.inference.predictor import Predictor
from jurassiglip.model.build import build_model
from jurassiglip.model.spec import ModelSpec
from jurassiglip.runtime.tracking import NullTracker
from jurassiglip.training.contrastive_pretrain import contrastive_objective
from jurassiglip.training.loop import fit, loop_settings
from jurassiglip.training.seg_finetune import segmentation_objective


@pytest.fixture
def one_thread():
    """Tiny tensors on two threads of a shared 2-core machine spend their time waiting for each other (ten
    times slower, measured); one thread also makes the numbers independent of the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(micro_data, micro_params):
    params = params_from_dict(micro_params)
    manifest = Manifest.load(micro_data / "manifest")
    tokenizer = load_tokenizer(micro_data / "tokenizer")
    ids, mask = tokenize(tokenizer, manifest.samples["sentence"].tolist(), params.model.arch.text_max_len)
    return params, manifest, tokenizer, ids, mask, ModelSpec.from_params(params, tokenizer)


def fresh_model(spec):
    torch.manual_seed(0)
    return build_model(spec)


def test_segmentation_finetuning_learns_to_use_the_text(setup, tmp_path, one_thread):
    params, manifest, tokenizer, ids, mask, spec = setup
    cfg = dataclasses.replace(params.finetune, epochs=30, patience=31, batch_size=16)
    model = fresh_model(spec)
    objective = segmentation_objective(model, manifest, ids, mask, cfg=cfg, train_split="train", val_split="val",
                                       seed=0, features_dir=tmp_path / "features", cache_fingerprint="learning",
                                       spec=spec, tokenizer=tokenizer)
    result = fit(objective, loop_settings(cfg), tmp_path / "checkpoints", run_fingerprint="learning",
                 tracker=NullTracker())
    assert result.epochs_run == 30
    assert result.best_val_loss < 0.85 * result.start_val_loss, result  # reached: 0.73

    predictor = Predictor(model, tokenizer, spec, Decision.from_config(params.evaluate), device="cpu")
    scores = split_metrics(evaluate_split(predictor, manifest, "train", resolution="original", batch_size=64,
                                          seed=0))
    shuffled, union = scores["baseline_shuffled_text"], scores["baseline_union"]
    numbers = {name: (round(scores[name], 3), round(shuffled[name], 3), round(union[name], 3))
               for name in ("cIoU", "gIoU")}  # model, shuffled captions, union of objects
    assert scores["gIoU"] > shuffled["gIoU"] + 0.12, numbers  # reached: +0.27
    assert scores["cIoU"] > shuffled["cIoU"] + 0.08, numbers  # reached: +0.19
    assert scores["cIoU"] > union["cIoU"] + 0.04, numbers  # reached: +0.10


def caption_retrieval(model, manifest: Manifest, ids: torch.Tensor, mask: torch.Tensor, split: str) -> dict:
    """Every targeted caption of `split` against every image of the split: is its own image the most similar?

    Returns:
        top1: share of captions whose own image ranks first; mean_rank: mean number of images ranked above
        it (chance: (n_images - 1) / 2); n_images.
    """
    rows = manifest.samples[(manifest.samples["split"] == split) & ~manifest.samples["no_target"]]
    images = np.unique(rows["image_index"].to_numpy())
    own = torch.from_numpy(np.searchsorted(images, rows["image_index"].to_numpy()))  # (C,) row of the own image
    pixels = torch.from_numpy(np.array(manifest.images[images])).permute(0, 3, 1, 2)  # (I, 3, S, S)
    captions = torch.tensor(rows["sample_id"].to_numpy(np.int64))  # a copy: pandas hands out a read-only view
    model.eval()
    with torch.no_grad():
        image_emb, _ = model.contrastive_features(pixels, ids[captions[:len(images)]], mask[captions[:len(images)]])
        _, text_emb = model.contrastive_features(pixels[own], ids[captions], mask[captions])
    similarity = text_emb @ image_emb.T  # (C, I)
    above = (similarity > similarity.gather(1, own[:, None])).sum(1).float()  # (C,) images ranked above its own
    return {"top1": float((above == 0).float().mean()), "mean_rank": float(above.mean()), "n_images": len(images)}


def test_contrastive_pretraining_learns_to_match_captions_and_images(setup, tmp_path, one_thread):
    params, manifest, tokenizer, ids, mask, spec = setup
    cfg = dataclasses.replace(params.pretrain, epochs=60, patience=61, batch_size=8)
    model = fresh_model(spec)
    before = caption_retrieval(model, manifest, ids, mask, "train")
    objective = contrastive_objective(model, manifest, ids, mask, cfg=cfg, train_split="train", val_split="val",
                                      seed=0, spec=spec, tokenizer=tokenizer)
    result = fit(objective, loop_settings(cfg), tmp_path, run_fingerprint="learning", tracker=NullTracker())
    after = caption_retrieval(model, manifest, ids, mask, "train")

    uniform = math.log(cfg.batch_size)  # the loss of a model that scores every pair of the batch alike
    assert result.epochs_run == 60
    assert result.best_val_loss < uniform - 0.1, (result, uniform)  # reached: 0.2 below
    chance_top1, chance_rank = 1 / after["n_images"], (after["n_images"] - 1) / 2
    assert before["top1"] < 2 * chance_top1, before  # the measure starts at chance
    assert after["top1"] > 2.5 * chance_top1, (before, after)  # reached: 4.5x chance
    assert after["mean_rank"] < 0.8 * chance_rank, (before, after)  # reached: 0.6x chance
