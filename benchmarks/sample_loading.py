"""R2: loading one training sample from the manifest vs the prototype's way.

Same sample ids (random training captions), same item (image, caption
tokens, target mask as tensors), loaded in turn by:

- prototype: open the JPEG, RGB, PIL-resize; pycocotools annToMask of every
  annotation of the ref, union, PIL-resize (benchmarks/prototype.py);
- manifest: jurassiglip's CaptionDataset (memory-mapped images.npy, packed
  masks.npy), what stage 1 and the live stage 2 read;
- feature cache: jurassiglip's CachedSegDataset (fp16 patch and text tokens
  + target), what stage 2 reads by default.

Both of ours are timed two ways: one sample at a time (`dataset[i]`), and
in batches of 64 (params.finetune.batch_size) through `__getitems__`, one
fancy index per array: what the stages' DataLoaders do. Per sample is then
the batch's time / 64. Targets stay bool in both (the loss converts them).

Two image sets:
- the default synthetic set (96-224 px JPEGs) at the tiny model size (128),
  built as build_manifest does (benchmarks/setups.py);
- COCO-sized images (480-640 px, the same generator with bigger sides, into a
  temporary folder) at the prototype's 512, with a 512 px manifest built
  from them by jurassiglip's build_manifest. Its feature cache holds random
  real-dims features (32x32 patches of 384, 64 text tokens), written by the
  real cache builder: reading cost is what is measured, not their values.

Page cache is warm for both sides (warm-up round first). Goal: >= 30x.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.harness import Options, interleaved, section, table, verdict
from benchmarks.prototype import PrototypeCaptionDataset, PrototypeLoader
from benchmarks.setups import REAL_VISION, tiny
from jurassiglip.data.datasets import CaptionDataset
from jurassiglip.data.build_manifest import build_manifest
from jurassiglip.data.manifest import Manifest
from jurassiglip.data.refs import read_refs
from jurassiglip.data.synthetic import generate
from jurassiglip.data.tokenizer import tokenize
from jurassiglip.training.features import CachedSegDataset, build_cache

NAME = "R2"
GOAL = 30.0
COCO_SIDES = (480, 640)  # COCO train2014 images are mostly 640 x 480
BATCH = 64  # samples per read in the batched variants (params.finetune.batch_size of the default)

# samples per round, warm-up rounds, timed rounds, COCO-sized images generated
FULL = dict(samples=300, warmup=1, repeats=7, coco_images=120)
QUICK = dict(samples=100, warmup=1, repeats=3, coco_images=30)


class RandomTowers(nn.Module):
    """Stands in for the frozen towers when only the cache's shapes matter (build_cache's interface)."""

    def __init__(self, patches: int, text_len: int, dim: int):
        super().__init__()
        self.shape = (patches, text_len, dim)
        self.anchor = nn.Parameter(torch.zeros(1))  # build_cache reads the device from a parameter

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        patches, _, dim = self.shape
        return torch.randn(len(images), patches, dim), None  # (B, N, D)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        _, text_len, dim = self.shape
        return torch.randn(len(ids), text_len, dim), mask, None  # (B, L, D)


def run(opts: Options) -> None:
    section(f"{NAME}: loading one training sample, manifest vs prototype (file decode + annToMask + resize)")
    cfg = QUICK if opts.quick else FULL
    setup = tiny(opts.quick)
    rows, agreement = [], []
    with tempfile.TemporaryDirectory(prefix="bench_r2_") as tmp:
        tmp = Path(tmp)
        # default synthetic set at the tiny model size
        manifest = setup.manifest
        ids = np.random.default_rng(opts.seed).choice(setup.train_ids(), cfg["samples"], replace=False)
        model = setup.model(opts.seed).eval()
        cache = build_cache(model, manifest, setup.input_ids, setup.attention_mask, ids, tmp / "features_tiny",
                            batch_size=64, fingerprint="benchmark")
        loader = PrototypeLoader(setup.source.grefs_path, setup.source.instances_path, setup.source.images_dir,
                                 manifest.image_size)
        label = "default synthetic (96-224 px)"
        rows += _compare(label, manifest, setup.input_ids, setup.attention_mask, loader, cache, ids, cfg)
        agreement.append((label, _agreement(loader, manifest, ids)))

        # COCO-sized images at the prototype's 512
        real = setup.params.model.real
        big, big_loader = _coco_sized(tmp, setup, cfg["coco_images"], real.image_size, opts.seed)
        big_ids = np.random.default_rng(opts.seed).choice(len(big.samples), min(cfg["samples"], len(big.samples)),
                                                          replace=False)
        ids_512, mask_512 = tokenize(setup.tokenizer, big.samples["sentence"].tolist(), real.text_max_len)
        grid = real.image_size // REAL_VISION["patch_size"]
        big_cache = build_cache(RandomTowers(grid * grid, real.text_max_len, real.shared_dim), big, ids_512,
                                mask_512, big_ids, tmp / "features_512", batch_size=16, fingerprint="benchmark")
        label = f"COCO-sized ({COCO_SIDES[0]}-{COCO_SIDES[1]} px)"
        rows += _compare(label, big, ids_512, mask_512, big_loader, big_cache, big_ids, cfg)
        agreement.append((label, _agreement(big_loader, big, big_ids)))

    print(f"{cfg['samples']} random training samples per round, the variants interleaved; median of "
          f"{cfg['repeats']} rounds after {cfg['warmup']} warm-up round; spread = IQR / median")
    print(table(["image set", "size", "variant", "us/sample", "spread", "speed-up", "goal", "verdict"], rows))
    for label, iou in agreement:
        print(f"sanity, {label}: prototype and manifest targets agree to mean IoU {iou:.3f} "
              f"(nearest vs bilinear mask resize)")


def _compare(label: str, manifest: Manifest, input_ids, attention_mask, loader: PrototypeLoader, cache,
             ids: np.ndarray, cfg: dict) -> list[list]:
    prototype = PrototypeCaptionDataset(loader, manifest, input_ids, attention_mask)
    ours = {"manifest": CaptionDataset(manifest, input_ids, attention_mask, with_target=True),
            "feature cache": CachedSegDataset(manifest, cache)}

    def one_by_one(dataset):
        return lambda: [dataset[int(i)] for i in ids]

    def batched(dataset):
        return lambda: [dataset.__getitems__(ids[k:k + BATCH].tolist()) for k in range(0, len(ids), BATCH)]

    variants = {"prototype": one_by_one(prototype)}
    for name, dataset in ours.items():
        variants[f"{name}, one sample per read"] = one_by_one(dataset)
        variants[f"{name}, batches of {BATCH} (as the stages read)"] = batched(dataset)
    times = interleaved(variants, repeats=cfg["repeats"], warmup=cfg["warmup"])
    base = times["prototype"].median
    rows = []
    for name, t in times.items():
        speedup = base / t.median
        ours = name != "prototype"
        rows.append([label, manifest.image_size, name, f"{t.median / len(ids) * 1e6:.0f}", f"{t.spread:.0%}",
                     f"{speedup:.1f}x", f">= {GOAL:g}x" if ours else "", verdict(speedup, GOAL) if ours else ""])
    return rows


def _coco_sized(tmp: Path, setup, n_images: int, size: int, seed: int) -> tuple[Manifest, PrototypeLoader]:
    """A small gRefCOCO-format set with COCO-sized images, and its manifest at `size`."""
    syn = setup.params.synthetic
    files = generate(tmp / "coco_sized", seed=seed, n_images={"train": n_images}, min_objects=syn.min_objects,
                     max_objects=syn.max_objects, min_side=COCO_SIDES[0], max_side=COCO_SIDES[1],
                     refs_per_image=syn.refs_per_image, no_target_share=syn.no_target_share,
                     novel_combos=list(syn.novel_combos), rle_share=syn.rle_share)
    refs = read_refs(files.grefs_path, files.instances_path, splits=["train"], max_refs_per_split=0,
                     drop_no_target=False)
    build_manifest(refs, files.images_dir, tmp / "manifest_512", image_size=size, on_bad_image="fail")
    loader = PrototypeLoader(files.grefs_path, files.instances_path, files.images_dir, size)
    return Manifest.load(tmp / "manifest_512"), loader


def _agreement(loader: PrototypeLoader, manifest: Manifest, ids: np.ndarray) -> float:
    """Mean IoU of the prototype's and the manifest's targets (both empty counts as 1)."""
    samples = manifest.samples
    ious = []
    for i in ids[:100]:
        _, proto = loader.load(int(samples.at[i, "image_id"]), int(samples.at[i, "ref_id"]))
        ours = manifest.target_mask([int(i)])[0]
        union = np.logical_or(proto, ours).sum()
        ious.append(np.logical_and(proto, ours).sum() / union if union else 1.0)
    return float(np.mean(ious))
