"""Inference: a trained checkpoint turned into masks, scores and pictures.

Files, in reading order: predictor.py (the one inference path: images +
captions -> probabilities, masks and no-target verdicts at any resolution;
used by the CLI, evaluate and the gallery), metrics.py (I/U -> cIoU, gIoU,
Pr@X, N-acc, T-acc; pure), evaluate.py (a split scored with both
baselines), render.py (overlays, heatmaps, panels; pure), gallery.py (which
validation images to show, and the gallery page).
"""
