"""Training: one loop and the two stages' objectives.

Files, in reading order: loop.py (the fit loop: epochs, early stopping,
autocast, checkpoints, resume; knows nothing of what is trained),
resume.py (where an interrupted run finds its checkpoints again: the output
folder, or a copy under .dvc/tmp/resume that `dvc exp run` cannot delete),
contrastive_pretrain.py (stage 1's objective: CLS vs caption, gradient
cache), features.py (the frozen-tower feature cache of stage 2),
seg_finetune.py (stage 2's objective: cross-attention and heads on cached or
live features), losses.py (contrastive, Dice, Focal, no-target).
"""
