"""evaluate: cIoU, gIoU, Pr@X, N-acc, T-acc per split, per kind, for novel combinations, with baselines."""

import logging

import pandas as pd

from jurassiglip.runtime import atomic

from jurassiglip.model import checkpoint
from jurassiglip.config import Params
from jurassiglip.data.manifest import Manifest
from jurassiglip.runtime.env import seed_everything
from jurassiglip.inference.evaluate import evaluate_split, split_metrics
from jurassiglip.inference.decision import Decision
from jurassiglip.inference.predictor import Predictor
from jurassiglip.runtime.entry import entry
from jurassiglip.runtime.paths import EVALUATE_DIR, FINETUNE_CHECKPOINTS, MANIFEST_DIR
from jurassiglip.runtime.tracking import StageTracker

NAME = "evaluate"

log = logging.getLogger(__name__)


def run(params: Params, tracker: StageTracker) -> None:
    cfg = params.evaluate
    seed_everything(params.seed)
    decision = Decision.from_config(cfg)
    best = FINETUNE_CHECKPOINTS / checkpoint.BEST
    predictor = Predictor.from_checkpoint(best, decision)
    manifest = Manifest.load(MANIFEST_DIR, predictor.image_size, f"the image_size of {best}")
    tracker.set_tags({"no_target_rule": decision.describe(), "eval_resolution": cfg.resolution})
    tables = []
    built = set(manifest.samples["split"])
    for split in cfg.splits:
        if split not in built:  # e.g. testA/testB of the first gRefCOCO release: build_manifest logged it
            log.warning("evaluate: split %r is not in the manifest (its refs file has none); skipped", split)
            continue
        table = evaluate_split(predictor, manifest, split, resolution=cfg.resolution,
                               batch_size=cfg.batch_size, seed=params.seed)
        tracker.log_metrics({split: split_metrics(table)})
        tables.append(table)
    samples = pd.concat(tables, ignore_index=True)
    atomic.write_with(EVALUATE_DIR / "samples.parquet", lambda tmp: samples.to_parquet(tmp, index=False))
    atomic.write_with(EVALUATE_DIR / "samples.csv", lambda tmp: samples.to_csv(tmp, index=False))
    tracker.log_metrics({"mask_threshold": cfg.mask_threshold, "no_target_min_area": cfg.no_target_min_area,
                         "no_target_threshold": cfg.no_target_threshold})
    tracker.log_artifact(EVALUATE_DIR / "samples.parquet")
    tracker.log_artifact(EVALUATE_DIR / "samples.csv")


main = entry(NAME, run)

if __name__ == "__main__":
    main()
