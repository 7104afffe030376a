"""The demo's Gradio page: inputs on the left, one result panel per phrase on the right.

Only `demo.run` imports this module (Gradio is the optional `demo` extra).
The page holds layout only: every answer comes from `DemoModel.segment`.
Element ids (`#image`, `#phrases`, `#segment`, `#status`, and per phrase k
`#verdict-k`, `#overlay-k`, `#heatmap-k`) are what the browser test drives.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when Gradio is imported: no calls home

import gradio as gr  # noqa: E402

from jurassiglip.inference.demo import Answer, DemoModel, Panel  # noqa: E402

log = logging.getLogger(__name__)

READY = "Upload or pick an image, type phrases (one per line) and press **Segment**."
PROBABILITY = (0.001, 0.999)  # the sliders' range for thresholds on a probability: Decision takes (0, 1)
HEATMAP_NOTE = "heatmap: foreground probability, dark purple 0 to yellow 1"


def build(model: DemoModel, examples: list[list[str]]) -> gr.Blocks:
    """The page for `model`; `examples` are [image path, phrases] rows (may be empty)."""
    start = model.decision  # None when the checkpoint or its decision could not be had: empty sliders
    with gr.Blocks(title="jurassiglip demo", analytics_enabled=False) as page:
        gr.Markdown(f"## jurassiglip demo\nCheckpoint `{model.checkpoint}`. Each phrase goes through "
                    f"`Predictor.predict`; the overlay is what `jurassiglip predict` writes.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="image")
                phrases = gr.Textbox(label="Phrases, one per line", lines=4, elem_id="phrases",
                                     placeholder="the blue shape\nall red shapes")
                with gr.Accordion("Decision (starts at params.yaml's evaluate section)", open=True):
                    mask = gr.Slider(*PROBABILITY, value=start and start.mask_threshold, step=0.001,
                                     elem_id="mask-threshold",
                                     label="mask threshold: a pixel is foreground when p is above")
                    rule = gr.Radio(["head", "area"], value=start and start.no_target_rule, elem_id="no-target-rule",
                                    label="no-target rule: the no-target head decides, or the mask area")
                    no_target = gr.Slider(*PROBABILITY, value=start and start.no_target_threshold, step=0.001,
                                          elem_id="no-target-threshold",
                                          label="head rule: no target when the head's probability is above")
                    min_area = gr.Slider(0, max(0.2, start.no_target_min_area if start else 0), step=0.0005,
                                         value=start and start.no_target_min_area, elem_id="no-target-min-area",
                                         label="area rule: no target when the mask covers less of the image than")
                button = gr.Button("Segment", variant="primary", elem_id="segment", interactive=not model.error)
                if examples:
                    gr.Examples(examples, inputs=[image, phrases], label="Validation images of the manifest")
            with gr.Column(scale=2):
                status = gr.Markdown(_message(Answer([], error=model.error)) if model.error else READY,
                                     elem_id="status")
                panels = gr.State([])

                @gr.render(inputs=panels)
                def show(items: list[Panel]) -> None:
                    for k, panel in enumerate(items):
                        _panel(k, panel)

        def answer(*inputs: Any) -> tuple[str, list[Panel]]:
            try:
                result = model.segment(*inputs)
            except Exception as err:  # the page's last line of defence: a message, the traceback in the log
                log.exception("segmenting failed")
                result = Answer([], error=f"unexpected {type(err).__name__}: {err} (details in the demo's log)")
            return _message(result), result.panels

        # preprocess=False: the image arrives as Gradio's file record, so an unreadable upload reaches
        # DemoModel.segment (and its message) instead of failing inside Gradio.
        gr.on([button.click, mask.release, no_target.release, min_area.release, rule.input], answer,
              inputs=[image, phrases, mask, rule, no_target, min_area], outputs=[status, panels], preprocess=False)
    return page


def _panel(k: int, panel: Panel) -> None:
    """One phrase: its verdict line and warnings, then overlay and heatmap side by side."""
    verdict = "no target" if panel.no_target else "target"
    lines = [f"**{k + 1}. \"{_plain(panel.text)}\"**",
             f"**verdict: {verdict}** · no-target probability {panel.no_target_prob:.3f} · "
             f"mask area {100 * panel.area:.2f} % · mean probability in the mask {panel.score:.3f}"]
    lines += [f"- warning: {_plain(w)}" for w in panel.warnings]
    with gr.Group():
        gr.Markdown("\n\n".join(lines), elem_id=f"verdict-{k}")
        with gr.Row():
            gr.Image(panel.overlay, format="png", label="overlay", interactive=False, elem_id=f"overlay-{k}",
                     buttons=["download", "fullscreen"])
            gr.Image(panel.heatmap, format="png", label=HEATMAP_NOTE, interactive=False, elem_id=f"heatmap-{k}",
                     buttons=["download", "fullscreen"])


def _plain(text: str) -> str:
    """User text shown as typed: Markdown and HTML punctuation escaped."""
    return re.sub(r"([\\`*_{}\[\]()<>#+!|~])", r"\\\1", text)


def _message(answer: Answer) -> str:
    return f"**Cannot segment**: {_plain(answer.error)}" if answer.error else _plain(answer.summary)
