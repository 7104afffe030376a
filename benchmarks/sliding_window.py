"""Sliding-window inference against the global view, on the pipeline's own run (a quality check).

Not a speed ratio like the R benchmarks: it scores one split of the default
run twice with the trained seg_finetune checkpoint, through the evaluate
stage's own `evaluate_split`, once from the training-size images (what the
evaluate stage does) and once with `Predictor.infer`'s sliding windows over
each image at its own size (read from build_manifest's source folder) plus
the global view. Run after `make repro`:

    .venv/bin/python -m benchmarks.sliding_window [--split val] [--stride 0.5]

The embedded images are at most 224 px for a 128 px training size, so the
windows see at most 1.75x the detail of the global view.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd

from benchmarks.setups import offline
from jurassiglip.config import load_params
from jurassiglip.data.images import read_image, to_rgb
from jurassiglip.data.manifest import Manifest
from jurassiglip.inference.evaluate import evaluate_split, split_metrics
from jurassiglip.inference.decision import Decision
from jurassiglip.inference.predictor import Predictor
from jurassiglip.model.checkpoint import BEST
from jurassiglip.runtime.paths import FINETUNE_CHECKPOINTS, MANIFEST_DIR, stage_dir

SHOWN = ("cIoU", "gIoU", "Pr@0.5", "Pr@0.9", "N-acc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="val")
    parser.add_argument("--stride", type=float, default=0.5, help="window step as a fraction of the training size")
    args = parser.parse_args()
    offline()
    params = load_params()
    predictor = Predictor.from_checkpoint(FINETUNE_CHECKPOINTS / BEST, Decision.from_config(params.evaluate),
                                          device="cpu")
    manifest = Manifest.load(MANIFEST_DIR, predictor.image_size)
    images_dir = stage_dir("build_manifest") / "source" / "images"
    files = manifest.images_table["file_name"]

    def original(image_index: int) -> np.ndarray:
        return np.asarray(to_rgb(read_image(images_dir / files.iloc[image_index])), dtype=np.uint8)

    rows = {}
    for name, originals in (("global view (evaluate stage)", None), (f"windows (stride {args.stride:g}) + global",
                                                                       original)):
        table = evaluate_split(predictor, manifest, args.split, resolution="original",
                               batch_size=params.evaluate.batch_size, seed=params.seed, originals=originals,
                               window_stride=args.stride)
        metrics = split_metrics(table)
        rows[name] = {key: round(float(metrics[key]), 4) for key in SHOWN}
    print(pd.DataFrame(rows).T.to_string())
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
