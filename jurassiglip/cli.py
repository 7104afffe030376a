"""Command line: `jurassiglip predict --image PATH --text "..." [--text ...] --out DIR`.

Writes, per caption, a binary mask PNG and an overlay PNG at the image's own
size, and one JSON line (caption, no-target verdict, mask area, score,
file names) to DIR/predictions.jsonl.

The decision flags (mask threshold, no-target rule and its thresholds)
default to the `evaluate` section of params.yaml: the one in the current
directory, else the one of the repository the checkpoint lives in, so that a
prediction decides as `dvc repro` evaluated.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from jurassiglip.runtime import atomic
from jurassiglip.model.checkpoint import BEST
from jurassiglip.config import PARAMS_FILE, load_params
from jurassiglip.runtime.entry import setup_logging
from jurassiglip.runtime.paths import FINETUNE_CHECKPOINTS

if TYPE_CHECKING:
    from jurassiglip.inference.predictor import Decision

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jurassiglip", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="segment what each caption refers to in one image")
    predict.add_argument("--image", required=True, type=Path, help="image file (any mode and size PIL reads)")
    predict.add_argument("--text", required=True, action="append", help="caption; repeat for several")
    predict.add_argument("--checkpoint", type=Path, default=FINETUNE_CHECKPOINTS / BEST,
                         help="trained checkpoint (default: %(default)s)")
    predict.add_argument("--out", required=True, type=Path, help="output folder")
    rule = predict.add_argument_group(
        "decision", f"each flag defaults to evaluate.<name> of ./{PARAMS_FILE}, else of the {PARAMS_FILE} of the "
                    f"repository holding --checkpoint (first folder above it with {PARAMS_FILE} and dvc.yaml)")
    rule.add_argument("--mask-threshold", type=float, help="foreground probability (evaluate.mask_threshold)")
    rule.add_argument("--no-target-rule", choices=("head", "area"),
                      help="head: the learned no-target head decides; area: a mask smaller than "
                           "--no-target-min-area means no target (evaluate.no_target_rule)")
    rule.add_argument("--no-target-threshold", type=float,
                      help="head rule: no-target probability above which a caption is no-target "
                           "(evaluate.no_target_threshold)")
    rule.add_argument("--no-target-min-area", type=float,
                      help="area rule: no-target when the mask covers less of the image (evaluate.no_target_min_area)")
    predict.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return _predict(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        log.error("%s", err)
        return 2


def _predict(args: argparse.Namespace) -> int:
    from jurassiglip.data.images import read_image
    from jurassiglip.inference.predictor import Predictor
    from jurassiglip.inference.render import prediction_overlay

    decision = _decision(args)
    predictor = Predictor.from_checkpoint(args.checkpoint, decision, device=args.device)
    image = read_image(args.image)
    results = predictor.predict(image, args.text)
    args.out.mkdir(parents=True, exist_ok=True)
    full = np.asarray(image)  # (H, W, 3): masks come back at the image's own size
    lines = []
    for k, result in enumerate(results):
        stem = f"{k:02d}_{_slug(result.text)}"
        mask_png = Image.fromarray(result.mask.astype(np.uint8) * 255, mode="L")  # uint8: images can be huge
        overlay_png = Image.fromarray(prediction_overlay(full, result.mask))
        atomic.write_with(args.out / f"{stem}_mask.png", lambda tmp: mask_png.save(tmp, format="PNG"))
        atomic.write_with(args.out / f"{stem}_overlay.png", lambda tmp: overlay_png.save(tmp, format="PNG"))
        lines.append(json.dumps({"text": result.text, "no_target": result.no_target,
                                 "no_target_prob": round(result.no_target_prob, 6), "area": round(result.area, 6),
                                 "score": round(result.score, 6), "mask": f"{stem}_mask.png",
                                 "overlay": f"{stem}_overlay.png"}))
        log.info("%r: %s, area %.4f, score %.3f", result.text, "no target" if result.no_target else "target",
                 result.area, result.score)
    atomic.write_text(args.out / "predictions.jsonl", "\n".join(lines) + "\n")
    return 0


DECISION_FLAGS = ("mask_threshold", "no_target_rule", "no_target_min_area", "no_target_threshold")


def _decision(args: argparse.Namespace) -> Decision:
    """The decision flags given, the others from params.yaml's evaluate section (see the module docstring)."""
    from jurassiglip.inference.predictor import Decision

    values = {name: getattr(args, name) for name in DECISION_FLAGS}
    missing = [name for name, value in values.items() if value is None]
    if missing:
        params = _params_for(args.checkpoint)
        if params is None:
            flags = " ".join(f"--{name.replace('_', '-')}" for name in missing)
            raise ValueError(f"no {PARAMS_FILE} in the current directory nor above {args.checkpoint} "
                             f"(a folder with {PARAMS_FILE} and dvc.yaml) to take defaults from: give {flags}")
        evaluate = load_params(params).evaluate
        values.update({name: getattr(evaluate, name) for name in missing})
        log.debug("decision defaults from %s: %s", params, ", ".join(f"{n} {values[n]}" for n in missing))
    return Decision(**values)


def _params_for(checkpoint: Path) -> Path | None:
    """./params.yaml, else that of the first folder above `checkpoint` holding params.yaml and dvc.yaml."""
    if Path(PARAMS_FILE).is_file():
        return Path(PARAMS_FILE)
    for folder in Path(checkpoint).resolve().parents:
        if (folder / PARAMS_FILE).is_file() and (folder / "dvc.yaml").is_file():
            return folder / PARAMS_FILE
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "caption"


if __name__ == "__main__":
    sys.exit(main())
