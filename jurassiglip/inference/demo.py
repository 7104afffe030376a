"""`jurassiglip demo`: a local web page to try a trained checkpoint on your own images and phrases.

Upload (or pick) an image, type phrases one per line, and see per phrase the
overlay, the probability heatmap, the no-target verdict with the head's
probability and the mask area, with the decision thresholds adjustable on
the page. It answers through the one inference path, `Predictor.predict`,
and draws with `render.prediction_overlay` and `render.heatmap`, so an
overlay on the page is pixel for pixel the PNG `jurassiglip predict` writes.

This module holds the command's arguments, the model behind the page
(`DemoModel`: bad inputs become a message, never an exception) and the
examples; `demo_page.py` lays out the Gradio page. Gradio is an optional
extra (`pip install -e ".[demo]"`), imported only when the demo runs.

Nothing is written outside Gradio's cache, which holds the uploads and the
images shown (what a download button serves) in a private temporary folder
removed when the demo stops. The page binds to 127.0.0.1 unless `--host`
says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jurassiglip.model.checkpoint import BEST
from jurassiglip.runtime.paths import FINETUNE_CHECKPOINTS, MANIFEST_DIR, stage_dir

if TYPE_CHECKING:
    from jurassiglip.inference.decision import Decision
    from jurassiglip.inference.predictor import Predictor

log = logging.getLogger(__name__)

# The page shows every phrase's overlay and heatmap at the image's own size; past 50 megapixels
# (a 48 MP phone photo still fits) that is gigabytes of PNGs for the browser: predict handles those.
MAX_PIXELS = 50_000_000
MAX_PHRASES = 16  # phrases per request: each adds two full-size images to the page
N_EXAMPLES = 8    # validation images offered as examples
SOURCE_IMAGES = stage_dir("build_manifest") / "source" / "images"  # the synthetic set's images
SOURCE_RECORD = stage_dir("build_manifest") / "source" / "source.json"  # gRefCOCO: names the images folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `demo` subcommand's flags: checkpoint, device, where to listen, and predict's decision flags."""
    from jurassiglip.cli import DECISION_FLAGS

    parser.add_argument("--checkpoint", type=Path, default=FINETUNE_CHECKPOINTS / BEST,
                        help="trained checkpoint (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 exposes the "
                             "page, unauthenticated, to every machine that can reach this one)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    rule = parser.add_argument_group("decision", "starting values of the page's sliders; each defaults as in "
                                                 "`jurassiglip predict` (evaluate.<name> of params.yaml)")
    for name in DECISION_FLAGS:
        flag = "--" + name.replace("_", "-")
        if name == "no_target_rule":
            rule.add_argument(flag, choices=("head", "area"), help=f"evaluate.{name}")
        else:
            rule.add_argument(flag, type=float, help=f"evaluate.{name}")


def run(args: argparse.Namespace) -> int:
    """Serve the page until Ctrl-C (or SIGTERM); 2 when Gradio is not installed or the port is taken."""
    try:
        from jurassiglip.inference import demo_page
    except ImportError as err:
        log.error("the demo needs Gradio (%s): pip install -e \".[demo]\"", err)
        return 2
    from jurassiglip.cli import _params_for

    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up checks, one line each
    model = DemoModel.load(args)
    if model.error:
        log.error("%s (the page says so too)", model.error)
    examples = example_rows(_params_for(args.checkpoint))
    # SIGTERM ends the demo like Ctrl-C, so the cache folder below is removed either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with tempfile.TemporaryDirectory(prefix="jurassiglip-demo-") as cache:
            os.environ["GRADIO_TEMP_DIR"] = cache  # Gradio reads it when the page's components are made
            page = demo_page.build(model, examples)
            allowed = sorted({str(Path(image).resolve().parent) for image, _ in examples})
            try:
                page.queue(default_concurrency_limit=1).launch(
                    server_name=args.host, server_port=args.port, share=False, inbrowser=False, quiet=True,
                    show_error=False, prevent_thread_lock=True, allowed_paths=allowed, enable_monitoring=False)
            except OSError as err:  # the port is taken, or the host is no address of this machine
                log.error("cannot listen on %s:%d (%s): give another --port or --host",
                          args.host, args.port, str(err).split(". ")[0])
                return 2
            log.info("demo on http://%s:%d (Gradio's cache: %s, removed on exit; Ctrl-C stops it)",
                     args.host, page.server_port, cache)
            page.block_thread()  # until Ctrl-C or SIGTERM, then closes the server
    except KeyboardInterrupt:  # before the page was up
        log.info("stopped")
    return 0


@dataclass
class Panel:
    """One phrase's answer, as the page shows it."""

    text: str
    no_target: bool
    no_target_prob: float
    area: float                 # predicted foreground fraction
    score: float                # mean probability inside the mask
    overlay: np.ndarray         # (H, W, 3) uint8: render.prediction_overlay, what predict writes
    heatmap: np.ndarray         # (H, W, 3) uint8: render.heatmap of the probabilities
    warnings: list[str] = field(default_factory=list)


@dataclass
class Answer:
    """What the page shows for one request: panels, or why there are none."""

    panels: list[Panel]
    summary: str = ""          # the image's size and the decision applied
    error: str | None = None   # a bad input or an unusable checkpoint, in one line


@dataclass
class DemoModel:
    """The checkpoint behind the page, or why there is none; `segment` answers one request."""

    checkpoint: Path
    predictor: Predictor | None = None
    decision: Decision | None = None   # the sliders' starting values
    meta: dict[str, Any] | None = None  # the checkpoint's stage and trained heads (check_trained_for)
    error: str | None = None

    @classmethod
    def load(cls, args: argparse.Namespace) -> DemoModel:
        """The checkpoint and the decision defaults as `predict` takes them; a failure is kept as `error`."""
        from jurassiglip.cli import _decision
        from jurassiglip.inference.predictor import Predictor
        from jurassiglip.model import checkpoint

        model = cls(Path(args.checkpoint))
        try:
            model.decision = _decision(args)
            payload = checkpoint.load(args.checkpoint)
            model.meta = {"stage": payload["stage"], "heads": payload["heads"]}
            model.predictor = Predictor.from_checkpoint(args.checkpoint, model.decision, device=args.device)
        except (ValueError, OSError, RuntimeError, checkpoint.CheckpointError) as err:  # torch's: RuntimeErrors
            model.error = str(err)  # names the checkpoint, or the flags to give
        return model

    def segment(self, upload: dict[str, Any] | None, phrases: str, mask_threshold: float, no_target_rule: str,
                no_target_threshold: float, no_target_min_area: float) -> Answer:
        """The panels for an uploaded image (Gradio's file record) and phrases one per line.

        A bad input (no, unreadable or huge image, no phrase, a rule the
        checkpoint was not trained for) gives an Answer with an error and no panels.
        """
        from jurassiglip.inference.decision import Decision
        from jurassiglip.inference.predictor import check_trained_for
        from jurassiglip.inference.render import heatmap, prediction_overlay
        from jurassiglip.model.checkpoint import CheckpointError

        if self.predictor is None:
            return Answer([], error=self.error)
        texts = [line.strip() for line in (phrases or "").splitlines() if line.strip()]
        try:
            if not upload or not upload.get("path"):
                raise ValueError("no image: upload one or pick an example")
            if not texts:
                raise ValueError("no phrase: type at least one, one per line")
            if len(texts) > MAX_PHRASES:
                raise ValueError(f"{len(texts)} phrases: the page takes up to {MAX_PHRASES} at a time")
            decision = Decision(float(mask_threshold), no_target_rule, float(no_target_min_area),
                                float(no_target_threshold))
            check_trained_for(self.checkpoint, self.meta, decision)
            image = read_upload(Path(upload["path"]), upload.get("orig_name") or "the image")
            predictor = copy.copy(self.predictor)  # the same model, this request's decision
            predictor.decision = decision
            results = predictor.predict(image, texts)
        except (ValueError, OSError, RuntimeError, CheckpointError) as err:  # out of memory: a RuntimeError
            return Answer([], error=str(err))
        full = np.asarray(image)  # (H, W, 3), as predict draws its overlays
        panels = [Panel(r.text, r.no_target, r.no_target_prob, r.area, r.score, prediction_overlay(full, r.mask),
                        heatmap(r.prob), list(r.warnings)) for r in results]
        return Answer(panels, summary=f"{len(panels)} phrase(s) on a {image.width}x{image.height} image; "
                                      f"{decision.describe()}.")


def read_upload(path: Path, name: str):
    """An uploaded file as RGB through predict's reader, refused above MAX_PIXELS; errors name `name`."""
    from PIL import Image

    from jurassiglip.data.images import read_image

    try:
        with Image.open(path) as opened:  # the header only: a huge image is refused before it is decoded
            width, height = opened.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{name}: cannot read the image ({str(err).replace(str(path), name)})") from None
    if width * height > MAX_PIXELS:
        raise ValueError(f"{name}: {width}x{height} is {width * height / 1e6:.0f} megapixels, more than the page "
                         f"shows ({MAX_PIXELS / 1e6:.0f}); `jurassiglip predict` takes any size")
    try:
        return read_image(path)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(str(err).replace(str(path), name)) from None


def example_rows(params_file: Path | None, limit: int = N_EXAMPLES) -> list[list[str]]:
    """[image path, phrases] for the first validation images of the manifest beside `params_file`.

    The phrases are captions of that image from the manifest: two that name
    something and one no-target caption when it has one. Empty when there is
    no built manifest or its images are not on disk.
    """
    from jurassiglip.data.manifest import Manifest
    from jurassiglip.data.refs import DataError

    if params_file is None:
        return []
    repo = Path(params_file).resolve().parent
    try:
        manifest = Manifest.load(repo / MANIFEST_DIR)
    except (DataError, OSError, ValueError) as err:
        log.info("no examples: %s", err)
        return []
    images_dir = _images_dir(repo)
    samples = manifest.samples
    rows = []
    for image in manifest.images_table[manifest.images_table.split == "val"].itertuples():
        if len(rows) == limit:
            break
        path = images_dir / image.file_name
        if not path.is_file():
            continue
        own = samples[samples.image_index == image.image_index].drop_duplicates("ref_id")
        phrases = list(own[~own.no_target].sentence[:2]) + list(own[own.no_target].sentence[:1])
        rows.append([str(path), "\n".join(phrases)])
    return rows


def _images_dir(repo: Path) -> Path:
    """The folder build_manifest read its images from: the synthetic set's, or the one source.json names."""
    record = repo / SOURCE_RECORD
    if not record.is_file():
        return repo / SOURCE_IMAGES
    images_dir = Path(json.loads(record.read_text())["images_dir"])
    return images_dir if images_dir.is_absolute() else repo / images_dir
