"""R3: a stage-2 epoch with its DataLoader, prototype-style vs ours (tiny preset).

- prototype-style: every caption decoded from the source files (JPEG, COCO
  annotations, resize), the frozen towers run live on every batch, then
  fusion + heads train with F.interpolate and the two autograd losses
  (benchmarks/prototype.py);
- prototype-style, our step: the same decoding and live towers, but
  jurassiglip.training.seg_finetune's live loss (matmul upsampling, one-pass loss):
  what the feature cache and the manifest alone are worth;
- ours: CachedSegDataset over the manifest and the fp16 feature cache, only
  fusion + head run (jurassiglip.training.seg_finetune's cached loss).

Same model, optimizer, batch size, DataLoader workers (params.finetune) and
the first batches of the same shuffled epoch (EpochSampler, epoch 0). A
whole prototype-style epoch takes minutes on 2 cores, so a fixed number of
batches of both is timed and the full epoch extrapolated from it. The
feature cache is a one-off cost of ours (reused every epoch, and by later
runs while its fingerprint holds); it is timed too and reported charged to
one epoch and spread over params.finetune.epochs. Goal: >= 5x per epoch.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from benchmarks.harness import Options, interleaved, section, table, verdict
from benchmarks.prototype import PrototypeCaptionDataset, PrototypeLoader, prototype_loss_fn
from benchmarks.setups import tiny
from jurassiglip.data.datasets import EpochSampler, batch_loader
from jurassiglip.training.features import CachedSegDataset, build_cache
from jurassiglip.training.seg_finetune import cached_loss_fn, live_loss_fn, train_head_only

NAME = "R3"
GOAL = 5.0

# timed batches per round, warm-up batches, timed rounds; cache_all: build the cache of the
# whole training split (as seg_finetune does) rather than of the timed batches only
FULL = dict(batches=30, warmup_batches=2, repeats=3, cache_all=True)
QUICK = dict(batches=5, warmup_batches=1, repeats=2, cache_all=False)


def run(opts: Options) -> None:
    section(f"{NAME}: stage-2 epoch incl. DataLoader, prototype-style (file decode + live towers) vs ours "
            f"(manifest + feature cache), tiny preset")
    cfg = QUICK if opts.quick else FULL
    setup = tiny(opts.quick)
    params, manifest = setup.params, setup.manifest
    finetune = params.finetune
    batch_size = finetune.batch_size
    sampler = EpochSampler(setup.train_ids(), None, seed=params.seed)
    sampler.set_epoch(0)
    order = np.fromiter(iter(sampler), dtype=np.int64)
    epoch_batches = math.ceil(len(order) / batch_size)
    timed = order[:cfg["batches"] * batch_size]
    warm = order[-cfg["warmup_batches"] * batch_size:]

    model = setup.model(opts.seed)
    with tempfile.TemporaryDirectory(prefix="bench_r3_") as tmp:
        cached_ids = order if cfg["cache_all"] else np.concatenate([timed, warm])
        model.eval()
        start = time.perf_counter()
        cache = build_cache(model, manifest, setup.input_ids, setup.attention_mask, cached_ids,
                            Path(tmp) / "features", batch_size=batch_size, fingerprint="benchmark")
        cache_seconds = time.perf_counter() - start
        n_cached_images = cache.meta["vision_passes"]

        trainable = model.trainable_for_finetune(with_no_target=finetune.no_target_weight > 0)
        optimizer = torch.optim.AdamW(trainable, lr=finetune.lr, weight_decay=finetune.weight_decay)
        train_head_only(model)
        loader = PrototypeLoader(setup.source.grefs_path, setup.source.instances_path, setup.source.images_dir,
                                 manifest.image_size)
        prototype = PrototypeCaptionDataset(loader, manifest, setup.input_ids, setup.attention_mask)
        variants = {
            "prototype-style": (prototype, prototype_loss_fn(model, finetune)),
            "prototype-style, our step": (prototype, live_loss_fn(model, finetune)),
            "ours": (CachedSegDataset(manifest, cache), cached_loss_fn(model, finetune)),
        }

        def epoch_part(dataset: Dataset, loss_fn, ids: np.ndarray):
            def go() -> None:
                batches = batch_loader(dataset, batch_size=batch_size, sampler=ids.tolist(),
                                     num_workers=finetune.num_workers)
                for batch in batches:
                    loss = loss_fn(batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            return go

        first = next(iter(batch_loader(prototype, sampler=warm.tolist(), batch_size=batch_size)))
        with torch.no_grad():
            losses = {name: float(fn(first)) for name, (_, fn) in variants.items() if name != "ours"}
        for dataset, loss_fn in variants.values():  # warm-up on other batches of the epoch
            epoch_part(dataset, loss_fn, warm)()
        times = interleaved({name: epoch_part(ds, fn, timed) for name, (ds, fn) in variants.items()},
                            repeats=cfg["repeats"], warmup=0)

    n_batches = cfg["batches"]
    proto, ours = times["prototype-style"].median, times["ours"].median
    rows = []
    for name, t in times.items():
        per_batch = t.median / n_batches
        speedup = proto / t.median
        rows.append([name, n_batches, len(timed), f"{t.median:.1f}", f"{t.spread:.0%}", f"{per_batch * 1e3:.0f}",
                     f"{per_batch * epoch_batches:.0f}", f"{speedup:.1f}x",
                     f">= {GOAL:g}x" if name == "ours" else "", verdict(speedup, GOAL) if name == "ours" else ""])
    print(f"batch {batch_size}, DataLoader num_workers={finetune.num_workers}, {n_batches} of the "
          f"{epoch_batches} batches of a training epoch ({len(order)} captions) timed per round; median of "
          f"{cfg['repeats']} interleaved rounds after {cfg['warmup_batches']} warm-up batch(es) each; "
          f"full epoch = ms/batch x {epoch_batches}")
    print(table(["variant", "batches", "samples", "s (timed)", "spread", "ms/batch", "s/epoch (est.)",
                 "speed-up", "goal", "verdict"], rows))
    print("sanity, one batch: prototype-style loss " + ", ".join(f"{v:.6f}" for v in losses.values()) +
          " (the prototype's way, ours): the same loss")
    epoch_ours = ours / n_batches * epoch_batches
    epoch_proto = proto / n_batches * epoch_batches
    scope = "the whole training split" if cfg["cache_all"] else "the timed and warm-up captions only (--quick)"
    print(f"one-off feature cache of {scope}: {cache_seconds:.1f} s ({n_cached_images} vision passes, "
          f"{len(cached_ids)} text passes)")
    if cfg["cache_all"]:
        epochs = finetune.epochs
        print(f"with that cache charged to a single epoch: {epoch_proto / (epoch_ours + cache_seconds):.1f}x; "
              f"spread over params.finetune.epochs = {epochs}: "
              f"{epoch_proto / (epoch_ours + cache_seconds / epochs):.1f}x")
