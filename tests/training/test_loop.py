"""Both training recipes on a micro manifest: the feature cache, the fit loop, resume, checkpoints."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as coco_mask

from jurassiglip.model import checkpoint
from jurassiglip.config import params_from_dict
from jurassiglip.data.datasets import CaptionDataset, EpochSampler, batch_loader
from jurassiglip.data.manifest import Manifest
from jurassiglip.data.tokenizer import load_tokenizer, tokenize
from jurassiglip.training.features import CachedSegDataset, build_cache
from jurassiglip.training.seg_finetune import SegmentationObjective, cached_loss_fn, live_loss_fn, train_head_only
from jurassiglip.model.build import build_model, model_from_checkpoint
from jurassiglip.model.spec import ModelSpec
from jurassiglip.training.contrastive_pretrain import ContrastiveObjective, contrastive_objective
from jurassiglip.runtime.tracking import NullTracker
from jurassiglip.training.loop import EpochBatches, LoopSettings, NonFiniteLoss, Objective, fit, lr_factor
from stages import contrastive_pretrain, seg_finetune


class Rows(NullTracker):
    """Collects what fit reports instead of writing MLflow runs (tracking has its own tests)."""

    def __init__(self):
        self.rows = []

    def log_epoch(self, plot, epoch, values):
        self.rows.append((epoch, values))

    def restore_epochs(self, plot, rows):
        self.rows = [(r["epoch"], r) for r in rows]


@pytest.fixture(scope="module")
def setup(micro_data, micro_params):
    params = params_from_dict(micro_params)
    manifest = Manifest.load(micro_data / "manifest")
    tokenizer = load_tokenizer(micro_data / "tokenizer")
    ids, mask = tokenize(tokenizer, manifest.samples["sentence"].tolist(), params.model.arch.text_max_len)
    spec = ModelSpec.from_params(params, tokenizer)
    return params, manifest, tokenizer, ids, mask, spec


def fresh_model(spec, seed=0):
    torch.manual_seed(seed)
    return build_model(spec)


def stage2_payload(spec, model, tokenizer):
    """What seg_finetune's objective hands to `checkpoint.save`."""
    return {"spec": spec, "model": model, "tokenizer": tokenizer, "stage": "seg_finetune",
            "heads": {"segmentation": True, "no_target": True}}


def stored_targets(manifest, sample_ids):
    """Training-size targets read without the manifest's code: each sample's RLE column decoded by pycocotools,
    resized by torch's antialiased bilinear (Pillow's filter, which build_manifest uses), >= 0.5."""
    size = manifest.image_size
    out = []
    for sample_id in sample_ids:
        row = manifest.samples.iloc[int(sample_id)]
        rle = {"size": [int(row["height"]), int(row["width"])], "counts": row["mask_rle"].encode("ascii")}
        full = torch.from_numpy(coco_mask.decode(rle).astype(np.float32))[None, None]
        out.append(F.interpolate(full, size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False)[0, 0].numpy() >= 0.5)
    return np.stack(out)


def count_images(model):
    """Count images through the vision tower (a forward hook on the real module)."""
    seen = []
    model.vision.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    return seen


def test_cache_has_one_vision_pass_per_image_and_is_reused(setup, tmp_path):
    params, manifest, _, ids, mask, spec = setup
    model = fresh_model(spec)
    seen = count_images(model)
    train = manifest.samples[manifest.samples["split"] == "train"]
    cache = build_cache(model, manifest, ids, mask, train["sample_id"].to_numpy(), tmp_path / "features",
                        batch_size=8, fingerprint="a")
    n_images = train["image_index"].nunique()
    assert len(train) > n_images  # several captions per image, yet...
    assert sum(seen) == n_images == cache.meta["vision_passes"]  # ...one vision pass per image
    assert cache.text.shape[0] == len(train) and cache.patches.dtype == np.float16
    build_cache(model, manifest, ids, mask, train["sample_id"].to_numpy(), tmp_path / "features",
                batch_size=8, fingerprint="a")
    assert sum(seen) == n_images  # same fingerprint: reused, nothing encoded again
    build_cache(model, manifest, ids, mask, train["sample_id"].to_numpy(), tmp_path / "features",
                batch_size=8, fingerprint="b")
    assert sum(seen) == 2 * n_images  # another fingerprint: rebuilt


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_are_read_whole_and_match_per_sample_reads(setup, tmp_path, num_workers):
    """A batch read in one go holds exactly the samples, in the sampler's order, that single reads give."""
    params, manifest, _, ids, mask, spec = setup
    train = manifest.samples.loc[manifest.samples["split"] == "train", "sample_id"].to_numpy()
    order = train[::-1][:10].copy()  # not sorted: the batch must follow the sampler, not the file
    model = fresh_model(spec)
    cache = build_cache(model, manifest, ids, mask, train, tmp_path / "features", batch_size=8, fingerprint="x")
    for dataset in (CaptionDataset(manifest, ids, mask, with_target=True), CachedSegDataset(manifest, cache)):
        batch = next(iter(batch_loader(dataset, sampler=order, batch_size=10, num_workers=num_workers)))
        assert batch["sample_id"].tolist() == order.tolist()
        assert batch["target"].dtype == torch.bool and batch["target"].shape[:2] == (10, 1)
        for row, sample_id in enumerate(order):
            single = dataset[int(sample_id)]
            assert single.keys() == batch.keys()
            for key, value in single.items():
                assert torch.equal(value, batch[key][row]), (type(dataset).__name__, key, sample_id)
        assert np.array_equal(batch["target"][:, 0].numpy(), stored_targets(manifest, order))
        assert batch["no_target"].tolist() == manifest.samples["no_target"].to_numpy()[order].tolist()


def test_cached_dataset_names_samples_missing_from_the_cache(setup, tmp_path):
    params, manifest, _, ids, mask, spec = setup
    split = manifest.samples["split"]
    train = manifest.samples.loc[split == "train", "sample_id"].to_numpy()
    test = manifest.samples.loc[split == "test", "sample_id"].to_numpy()
    cache = build_cache(fresh_model(spec), manifest, ids, mask, train, tmp_path / "features", batch_size=8,
                        fingerprint="x")
    dataset = CachedSegDataset(manifest, cache)
    with pytest.raises(IndexError, match=rf"samples \[{test[0]}\] are not in the feature cache"):
        next(iter(batch_loader(dataset, sampler=[int(train[0]), int(test[0])], batch_size=2)))


def test_same_inputs_give_byte_identical_checkpoints_and_cache(setup, tmp_path):
    """DVC hashes outputs by their bytes: identical runs must not write different files."""
    params, manifest, tokenizer, ids, mask, spec = setup
    train = manifest.samples.loc[manifest.samples["split"] == "train", "sample_id"].to_numpy()
    folders = []
    for name in ("one", "two"):
        model = fresh_model(spec)
        checkpoint.save(tmp_path / f"{name}.safetensors", stage2_payload(spec, model, tokenizer))
        build_cache(model, manifest, ids, mask, train, tmp_path / name, batch_size=8, fingerprint="same")
        folders.append(tmp_path / name)
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    files = sorted(p.name for p in folders[0].iterdir())
    assert files == sorted(p.name for p in folders[1].iterdir())
    for name in files:
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name


def test_cached_and_live_paths_give_the_same_loss(setup, tmp_path):
    params, manifest, _, ids, mask, spec = setup
    model = fresh_model(spec)
    model.trainable_for_finetune()
    train_head_only(model)
    sample_ids = manifest.samples.loc[manifest.samples["split"] == "train", "sample_id"].to_numpy()[:12]
    cache = build_cache(model, manifest, ids, mask, sample_ids, tmp_path / "features", batch_size=4,
                        fingerprint="x")
    train_head_only(model)
    cached_batch = next(iter(batch_loader(CachedSegDataset(manifest, cache), batch_size=12, sampler=sample_ids)))
    live_batch = next(iter(batch_loader(CaptionDataset(manifest, ids, mask, with_target=True), batch_size=12,
                                      sampler=sample_ids)))
    cached = cached_loss_fn(model, params.finetune)(cached_batch)
    live = live_loss_fn(model, params.finetune)(live_batch)
    assert torch.equal(cached_batch["sample_id"], live_batch["sample_id"])
    assert float(cached.detach()) == pytest.approx(float(live.detach()), abs=2e-3)


def test_stage2_loss_adds_the_weighted_no_target_term(setup, tmp_path):
    params, manifest, _, ids, mask, spec = setup
    model = fresh_model(spec)
    train_head_only(model)
    samples = manifest.samples[manifest.samples["split"] == "train"]
    # a batch holding both kinds of caption, so the no-target term sees both labels
    sample_ids = np.concatenate([samples.loc[samples["no_target"], "sample_id"].to_numpy()[:3],
                                 samples.loc[~samples["no_target"], "sample_id"].to_numpy()[:5]])
    batch = next(iter(batch_loader(CaptionDataset(manifest, ids, mask, with_target=True), batch_size=8,
                                 sampler=sample_ids)))
    assert batch["no_target"].tolist() == [True] * 3 + [False] * 5
    without = live_loss_fn(model, dataclasses.replace(params.finetune, no_target_weight=0.0))(batch)
    weighted = live_loss_fn(model, dataclasses.replace(params.finetune, no_target_weight=2.5))(batch)
    with torch.no_grad():
        patches, _ = model.encode_image(batch["image"])
        tokens, text_mask, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
        _, nt_logits = model.decode(patches, tokens, text_mask, batch["image"])
        bce = torch.nn.functional.binary_cross_entropy_with_logits(nt_logits, batch["no_target"].float())
    assert float((weighted - without).detach()) == pytest.approx(2.5 * float(bce), rel=1e-5)


class DyingObjective(SegmentationObjective):
    """Killed in the middle of epoch 2, after epoch 1's checkpoint."""

    def train_batches(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return super().train_batches(epoch)


def _seg_fit(setup, model, ckpt_dir, epochs, tracker, schedule="constant", objective_class=SegmentationObjective):
    params, manifest, tokenizer, ids, mask, spec = setup
    split = manifest.samples["split"]
    train_ids = manifest.samples.loc[split == "train", "sample_id"].to_numpy()
    val_ids = manifest.samples.loc[split == "val", "sample_id"].to_numpy()
    batches = EpochBatches(CaptionDataset(manifest, ids, mask, with_target=True), EpochSampler(train_ids, None, seed=3),
                           EpochSampler(val_ids, None, seed=3, shuffle=False), batch_size=16, num_workers=0)
    objective = objective_class(model, batches, cfg=params.finetune, spec=spec, tokenizer=tokenizer)
    settings = LoopSettings(epochs=epochs, patience=5, log_every=1, max_val_batches=0, lr=1e-2, weight_decay=0.01,
                            lr_schedule=schedule)
    return fit(objective, settings, ckpt_dir, run_fingerprint="same-run", tracker=tracker)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_interrupted_fit_resumes_to_the_same_result(setup, tmp_path, schedule):
    whole = fresh_model(setup[5])
    result = _seg_fit(setup, whole, tmp_path / "whole", 3, Rows(), schedule=schedule)

    interrupted = fresh_model(setup[5])
    with pytest.raises(KeyboardInterrupt):
        _seg_fit(setup, interrupted, tmp_path / "resumed", 3, Rows(), schedule, DyingObjective)
    tracker = Rows()
    restarted = fresh_model(setup[5], seed=123)  # weights come from the latest checkpoint, not from the seed
    resumed = _seg_fit(setup, restarted, tmp_path / "resumed", 3, tracker, schedule=schedule)
    assert resumed.resumed_from_epoch == 1
    assert resumed.best_val_loss == pytest.approx(result.best_val_loss, rel=1e-6)
    assert [epoch for epoch, _ in tracker.rows] == [1, 2, 3]  # the curve keeps epoch 1 of the first attempt
    for (name, a), b in zip(whole.state_dict().items(), restarted.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_corrupt_latest_checkpoint_starts_over_with_a_message(setup, tmp_path, caplog):
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    (ckpt_dir / checkpoint.LATEST).write_bytes(b"not a checkpoint, half written")
    with caplog.at_level(logging.INFO):
        result = _seg_fit(setup, fresh_model(setup[5]), ckpt_dir, 1, Rows())
    assert result.resumed_from_epoch == 0 and result.epochs_run == 1
    assert "latest.safetensors: not a readable checkpoint (" in caplog.text and "; not resumed" in caplog.text
    assert "nothing to resume" in caplog.text and "starting over at epoch 1" in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match="best.safetensors"):
        (ckpt_dir / checkpoint.BEST).write_bytes(b"\x00" * 10)
        checkpoint.load(ckpt_dir / checkpoint.BEST)


class NanObjective(Objective):
    """A loss that turns NaN in training (e.g. a log of zero somewhere); validation (no grad) stays finite."""

    def __init__(self, model, batches):
        self.model, self.batches = model, batches
        self._trainable = model.trainable_for_finetune()

    def trainable(self):
        return self._trainable

    def train_batches(self, epoch):
        return self.batches.train(epoch)

    def val_batches(self):
        return self.batches.val()

    def loss(self, batch):
        return torch.tensor(float("nan") if torch.is_grad_enabled() else 1.0)

    def checkpoint_payload(self):
        raise AssertionError("no checkpoint after a non-finite loss")


def test_non_finite_loss_names_step_and_samples(setup, tmp_path):
    params, manifest, tokenizer, ids, mask, spec = setup
    sampler = EpochSampler(manifest.samples["sample_id"].to_numpy()[:8], None, seed=0, shuffle=False)
    batches = EpochBatches(CaptionDataset(manifest, ids, mask, with_target=True), sampler, sampler, batch_size=4,
                           num_workers=0)
    settings = LoopSettings(epochs=1, patience=1, log_every=1, max_val_batches=0, lr=1e-3, weight_decay=0.01)
    with pytest.raises(NonFiniteLoss, match=r"epoch 1 step 1.*sample ids \[0, 1, 2, 3\]"):
        fit(NanObjective(fresh_model(spec), batches), settings, tmp_path, run_fingerprint="f", tracker=Rows())
    assert not (tmp_path / checkpoint.BEST).exists()


def test_contrastive_objective_checkpoints_stage_1_and_logs_the_logit_scale(setup, tmp_path):
    """What stage 1 hands the loop: its checkpoint (stage, heads) and the logit scale on the curve."""
    params, manifest, tokenizer, ids, mask, spec = setup
    model = fresh_model(spec)
    objective = contrastive_objective(model, manifest, ids, mask, cfg=params.pretrain, train_split="train",
                                      val_split="val", seed=0, spec=spec, tokenizer=tokenizer)
    tracker = Rows()
    settings = LoopSettings(epochs=1, patience=1, log_every=1, max_val_batches=1, lr=1e-3, weight_decay=0.0)
    fit(objective, settings, tmp_path, run_fingerprint="f", tracker=tracker)
    [(epoch, row)] = tracker.rows
    assert epoch == 1 and row["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()))
    best = checkpoint.load(tmp_path / checkpoint.BEST)
    assert best["stage"] == contrastive_pretrain.NAME
    assert best["heads"] == {"segmentation": False, "no_target": False}
    assert {p for p in model.parameters() if p.requires_grad} == set(objective.trainable())


def test_objectives_write_their_stage_name():
    assert ContrastiveObjective.STAGE == contrastive_pretrain.NAME and SegmentationObjective.STAGE == seg_finetune.NAME
    assert (ContrastiveObjective.STAGE, SegmentationObjective.STAGE) == checkpoint.STAGES


def test_checkpoint_rebuilds_the_model_without_params(setup, tmp_path):
    params, manifest, tokenizer, ids, mask, spec = setup
    model = fresh_model(spec)
    for p in model.parameters():  # move LoRA B off zero so merging has something to fold in
        p.data.add_(0.01 * torch.randn_like(p))
    model.eval()
    checkpoint.save(tmp_path / checkpoint.BEST, stage2_payload(spec, model, tokenizer))
    rebuilt, rebuilt_tokenizer, rebuilt_spec = model_from_checkpoint(tmp_path / checkpoint.BEST)
    merged, _, _ = model_from_checkpoint(tmp_path / checkpoint.BEST, merge=True)
    images = torch.from_numpy(np.array(manifest.images[:2])).permute(0, 3, 1, 2)
    assert rebuilt_spec == spec
    assert rebuilt_tokenizer("the red circle")["input_ids"] == tokenizer("the red circle")["input_ids"]
    with torch.no_grad():
        expected = model(images, ids[:2], mask[:2])
        assert torch.equal(rebuilt.eval()(images, ids[:2], mask[:2]), expected)
        assert torch.allclose(merged.eval()(images, ids[:2], mask[:2]), expected, atol=1e-4)
    assert not any("lora_" in name for name, _ in merged.named_parameters())


def test_cosine_schedule_decays_from_base_to_zero():
    assert lr_factor("cosine", 0.0) == 1.0
    assert lr_factor("cosine", 0.5) == pytest.approx(0.5)
    assert lr_factor("cosine", 0.999) < 1e-4
    assert lr_factor("constant", 0.7) == 1.0


def test_one_caption_per_image_sampler(setup):
    manifest = setup[1]
    rows = manifest.samples[manifest.samples["split"] == "train"]
    sampler = EpochSampler(rows["sample_id"].to_numpy(), rows["image_index"].to_numpy(), seed=0,
                           one_per_image=True)
    sampler.set_epoch(1)
    first = list(sampler)
    images = manifest.samples.loc[first, "image_index"]
    assert len(first) == len(sampler) == rows["image_index"].nunique() == images.nunique()
    assert list(sampler) == first  # same epoch, same order (resume-safe)
    sampler.set_epoch(2)
    assert list(sampler) != first
