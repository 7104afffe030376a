"""R1: one stage-2 training step from cached features vs with the frozen towers run live.

Both steps train the same cross-attention + head on the same 64 captions; the
live one also runs the vision and text towers (without grad) first. Printed
next to the FLOP ratio of the two (torch.utils.flop_counter), so the wall-clock
speed-up can be judged against what the arithmetic allows.

    python benchmarks/stage2_step.py [--repeats 30] [--threads 2]

Needs the manifest of `dvc repro build_manifest`. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from jurassiglip.config import load_params
from jurassiglip.data.manifest import Manifest
from jurassiglip.data.tokenizer import caption_tokenizer, tokenize
from jurassiglip.finetuning import train_head_only
from jurassiglip.losses import segmentation_loss
from jurassiglip.model.build import build_model, model_spec
from jurassiglip.stage import MANIFEST_DIR, TOKENIZER_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    params = load_params()
    cfg = params.finetune
    manifest = Manifest.load(MANIFEST_DIR)
    tokenizer = caption_tokenizer(params.model, TOKENIZER_DIR)
    model = build_model(model_spec(params, tokenizer))
    optimizer = torch.optim.AdamW(model.trainable_for_finetune(), lr=cfg.lr)
    train_head_only(model)

    rows = manifest.samples[manifest.samples["split"] == params.data.train_split].head(args.batch)
    ids, mask = tokenize(tokenizer, rows["sentence"].tolist(), params.model.arch.text_max_len)
    images = torch.from_numpy(np.array(manifest.images[rows["image_index"].to_numpy()])).permute(0, 3, 1, 2)
    target = torch.from_numpy(manifest.target_mask(rows["sample_id"].to_numpy())).float().unsqueeze(1)
    with torch.no_grad():
        patches, _ = model.encode_image(images)
        tokens, token_mask, _ = model.encode_text(ids, mask)
    cached = (patches.half(), tokens.half(), token_mask)

    def loss_of(p, t, m):
        logits = model.segment(p, t, m)
        return segmentation_loss(logits, target, dice_weight=cfg.dice_weight, focal_weight=cfg.focal_weight,
                                 alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)

    def cached_step():
        loss = loss_of(*cached)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def live_step():
        with torch.no_grad():
            p, _ = model.encode_image(images)
            t, m, _ = model.encode_text(ids, mask)
        loss = loss_of(p, t, m)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    results = {}
    for name, step in (("cached", cached_step), ("live", live_step)):
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        results[name] = (statistics.median(times), flops)

    print(f"stage-2 step, batch {args.batch}, preset {params.model.preset}, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'path':8} {'ms/step':>9} {'GFLOP':>8} {'GFLOP/s':>8}")
    for name, (seconds, flops) in results.items():
        print(f"{name:8} {seconds * 1e3:9.1f} {flops / 1e9:8.2f} {flops / 1e9 / seconds:8.1f}")
    wall = results["live"][0] / results["cached"][0]
    flop = results["live"][1] / results["cached"][1]
    print(f"speed-up live/cached: wall {wall:.2f}x, FLOPs {flop:.2f}x, wall/FLOP ratio {wall / flop:.2f}")


if __name__ == "__main__":
    main()
