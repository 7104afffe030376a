"""render_val: a gallery of validation images, a row per caption (ground truth | TP/FP/FN | probability)."""

import json

import pandas as pd

from jurassiglip.runtime import atomic

from jurassiglip.model import checkpoint
from jurassiglip.config import Params
from jurassiglip.data.manifest import Manifest
from jurassiglip.inference.gallery import gallery_html, image_panel, pick_images
from jurassiglip.inference.decision import Decision
from jurassiglip.inference.predictor import Predictor
from jurassiglip.runtime.entry import entry
from jurassiglip.runtime.paths import EVALUATE_DIR, FINETUNE_CHECKPOINTS, GALLERY_DIR, MANIFEST_DIR
from jurassiglip.runtime.tracking import StageTracker

NAME = "render_val"


def run(params: Params, tracker: StageTracker) -> None:
    cfg = params.render
    decision = Decision.from_config(params.evaluate)
    best = FINETUNE_CHECKPOINTS / checkpoint.BEST
    predictor = Predictor.from_checkpoint(best, decision)
    manifest = Manifest.load(MANIFEST_DIR, predictor.image_size, f"the image_size of {best}")
    table = pd.read_parquet(EVALUATE_DIR / "samples.parquet").set_index("sample_id", drop=False)
    split_rows = manifest.samples[manifest.samples["split"] == cfg.split]
    split_rows = split_rows[split_rows["sample_id"].isin(table.index)]
    if split_rows.empty:
        raise SystemExit(f"render.split = {cfg.split!r} was not evaluated (evaluate.splits {params.evaluate.splits})")
    headline = json.loads((EVALUATE_DIR / "metrics.json").read_text())[cfg.split]
    with atomic.atomic_dir(GALLERY_DIR) as tmp:
        entries = []
        for image_index, sample_ids in pick_images(split_rows, cfg.n_images, cfg.max_captions):
            name = f"image_{int(manifest.images_table.at[image_index, 'image_id'])}.png"
            image_panel(predictor, manifest, table, image_index, sample_ids).save(tmp / name)
            entries.append((name.removesuffix(".png"), name))
        numbers = {k: v for k, v in headline.items() if not isinstance(v, dict)}
        (tmp / "index.html").write_text(gallery_html(entries, numbers, decision.describe(),
                                                     title=f"jurassiglip gallery: {cfg.split}"))
    tracker.log_artifacts(GALLERY_DIR, "gallery")
    tracker.log_metrics({"n_panels": len(entries)})


main = entry(NAME, run)

if __name__ == "__main__":
    main()
