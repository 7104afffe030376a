"""Command line: `jurassiglip predict --image PATH --text "..." [--text ...] --out DIR`.

Writes, per caption, a binary mask PNG and an overlay PNG at the image's own
size (upright, by the photo's EXIF orientation), and one JSON line (caption,
no-target verdict, mask area, score, file names, the caption's words the
tokenizer does not know and warnings) to DIR/predictions.jsonl. DIR is
written as a whole: a new folder that replaces the old one once complete.

Exit codes: 0 done; 2 refused input (one line naming the flag, file or
value, before the model runs where it can be known then); 1 the outputs
could not be written (DIR left as it was); 130 interrupted.

The decision flags (mask threshold, no-target rule and its thresholds)
default to the `evaluate` section of params.yaml: the one in the current
directory, else the one of the repository the checkpoint lives in, so that a
prediction decides as `dvc repro` evaluated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import torch
from PIL import Image

from jurassiglip.runtime import atomic
from jurassiglip.model.checkpoint import BEST, CheckpointError
from jurassiglip.config import PARAMS_FILE, load_params
from jurassiglip.runtime.entry import setup_logging
from jurassiglip.runtime.paths import FINETUNE_CHECKPOINTS
from jurassiglip.inference import demo

if TYPE_CHECKING:
    from jurassiglip.inference.decision import Decision

log = logging.getLogger(__name__)


class OneLineErrors(argparse.ArgumentParser):
    """argparse, with a usage error in one line (the usage itself is what --help is for)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrors(prog="jurassiglip", description=__doc__.splitlines()[0])
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
    predict.add_argument("--sliding-window", action="store_true",
                         help="also decode half-overlapping windows of the training size over the image at its own "
                              "size, averaged with the global view (for images much larger than the training size; "
                              "the no-target verdict stays the global view's)")
    demo.add_arguments(commands.add_parser("demo", help="a local web page to try a checkpoint on images and phrases"))
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "demo":
        return demo.run(args)
    try:
        return _predict(args)
    except WriteError as err:  # the machine's fault, not the input's (disk full, ...): nothing was written
        log.error("%s", err)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted: %s left as it was", args.out)
        return 130
    except (ValueError, OSError, CheckpointError, torch.OutOfMemoryError) as err:  # the input's: one line
        log.error("%s", err)
        return 2


class WriteError(Exception):
    """The output folder could not be written once the predictions were made."""


def _predict(args: argparse.Namespace) -> int:
    """Every input is checked before the model runs: decision flags, device, --out, captions, image.

    The outputs go into a temporary sibling of --out, created before the
    checkpoint is loaded (so an unwritable place fails first), and swapped in
    for --out once complete: a failure leaves --out as it was, and a rerun
    with fewer captions leaves no stale files.
    """
    from jurassiglip.data.images import read_image
    from jurassiglip.inference.predictor import Predictor, check_captions, inference_device

    decision = _decision(args)
    device = inference_device(args.device)
    out = _output_folder(args.out)
    check_captions(args.text)
    image = read_image(args.image)
    with contextlib.ExitStack() as stack:
        try:
            staging = stack.enter_context(atomic.atomic_dir(out))
        except OSError as err:
            raise OSError(f"--out {args.out}: cannot create a folder in {out.parent} ({err.strerror})") from None
        predictor = Predictor.from_checkpoint(args.checkpoint, decision, device=device)
        results = predictor.predict(image, args.text, sliding_window=args.sliding_window)
        try:
            _write_outputs(staging, np.asarray(image), results)
            stack.close()  # the swap: the staging folder becomes --out
        except OSError as err:
            raise WriteError(f"cannot write the predictions to {args.out} ({err}); it was left as it was") from None
    return 0


def _write_outputs(folder: Path, full: np.ndarray, results: list) -> None:
    """Per caption a mask and an overlay PNG at the image's size (full: (H, W, 3)), and predictions.jsonl."""
    from jurassiglip.inference.render import prediction_overlay

    lines = []
    for k, result in enumerate(results):
        stem = f"{k:02d}_{_slug(result.text)}"
        mask_png = Image.fromarray(result.mask.astype(np.uint8) * 255, mode="L")  # uint8: images can be huge
        overlay_png = Image.fromarray(prediction_overlay(full, result.mask))
        atomic.write_with(folder / f"{stem}_mask.png", lambda tmp: mask_png.save(tmp, format="PNG"))
        atomic.write_with(folder / f"{stem}_overlay.png", lambda tmp: overlay_png.save(tmp, format="PNG"))
        lines.append(json.dumps({"text": result.text, "no_target": result.no_target,
                                 "no_target_prob": round(result.no_target_prob, 6), "area": round(result.area, 6),
                                 "score": round(result.score, 6), "mask": f"{stem}_mask.png",
                                 "overlay": f"{stem}_overlay.png", "unknown_words": result.unknown_words,
                                 "warnings": result.warnings}))
        log.info("%r: %s, area %.4f, score %.3f", result.text, "no target" if result.no_target else "target",
                 result.area, result.score)
    atomic.write_text(folder / PREDICTIONS, "\n".join(lines) + "\n")


PREDICTIONS = "predictions.jsonl"
OUTPUT_FILE = re.compile(r"\d{2,}_[a-z0-9_]+_(mask|overlay)\.png")  # the PNG names `_write_outputs` gives


def _output_folder(out: Path) -> Path:
    """--out resolved, refused where replacing it as a whole could lose what predict did not write.

    A new or empty folder, or one holding only an earlier predict's files, is
    fine: the new output replaces it entirely.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder; give a folder to write the predictions into")
    resolved = out.resolve()
    if resolved == Path.cwd() or resolved in Path.cwd().parents:
        raise ValueError(f"--out {out}: is the current folder or one above it; give a folder of its own")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir()
                         if not (p.is_file() and (p.name == PREDICTIONS or OUTPUT_FILE.fullmatch(p.name))))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ValueError(f"--out {out}: holds files predict did not write ({shown}); predict replaces its "
                             f"folder as a whole, so give a new or empty folder, or an earlier predict output")
    return resolved


DECISION_FLAGS = ("mask_threshold", "no_target_rule", "no_target_min_area", "no_target_threshold")


def _decision(args: argparse.Namespace) -> Decision:
    """The decision flags given, the others from params.yaml's evaluate section (see the module docstring)."""
    from jurassiglip.inference.decision import Decision, DecisionError

    values = {name: getattr(args, name) for name in DECISION_FLAGS}
    given = {name for name, value in values.items() if value is not None}
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
    try:
        return Decision(**values)
    except DecisionError as err:  # a flag: params.yaml's evaluate section was validated when loaded
        where = f"--{err.name.replace('_', '-')} {err.value}" if err.name in given else f"evaluate.{err.name}"
        raise ValueError(f"{where}: {err.why}") from None


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
