"""The decision rule: from probabilities to masks and no-target verdicts (SPEC §5).

A pixel is foreground when its probability exceeds `mask_threshold`. A
caption is no-target, with the `head` rule, when the learned no-target
head's probability exceeds `no_target_threshold`; with the `area` rule, when
the predicted foreground covers less than `no_target_min_area` of the image.
The values come from params.yaml's evaluate section (or predict's flags,
or the demo's sliders) and are checked here, so every caller gets the same
ranges.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from jurassiglip.config import EvaluateConfig


class DecisionError(ValueError):
    """A decision setting out of its range, naming it (`name` as in params.yaml's evaluate section)."""

    def __init__(self, name: str, value: object, why: str):
        super().__init__(f"{name} = {value!r} {why}")
        self.name, self.value, self.why = name, value, why


@dataclass(frozen=True)
class Decision:
    """Mask threshold and no-target rule (the numbers reported next to the metrics).

    No defaults here: they live in params.yaml's evaluate section
    (`from_config`), which the CLI reads too.
    """

    mask_threshold: float        # sigmoid probability above which a pixel is foreground
    no_target_rule: str          # head | area
    no_target_min_area: float    # area rule: foreground fraction below which a caption is no-target
    no_target_threshold: float   # head rule: no-target probability above which a caption is no-target

    def __post_init__(self) -> None:
        """Refuse a rule or a threshold out of its range, with the ranges of params.yaml's evaluate section.

        Here too, not only in params.yaml's validation, because the CLI flags
        and the Python API build a Decision without it. A threshold of 5 or
        NaN would make every mask empty (any comparison with NaN is False),
        and -1 every caption no-target: answers that look valid but are not.
        """
        if self.no_target_rule not in ("head", "area"):
            raise DecisionError("no_target_rule", self.no_target_rule, "must be 'head' or 'area'")
        for name, low_closed in (("mask_threshold", False), ("no_target_threshold", False),
                                 ("no_target_min_area", True)):
            value = getattr(self, name)
            inside = isinstance(value, numbers.Real) and not isinstance(value, bool) and (
                (0.0 <= value < 1.0) if low_closed else (0.0 < value < 1.0))  # False for NaN
            if not inside:
                raise DecisionError(name, value, "must be a fraction in [0, 1)" if low_closed else
                                    "must be a probability in (0, 1)")

    @classmethod
    def from_config(cls, cfg: EvaluateConfig) -> Decision:
        return cls(cfg.mask_threshold, cfg.no_target_rule, cfg.no_target_min_area, cfg.no_target_threshold)

    def describe(self) -> str:
        rule = (f"no-target when the no-target head gives p > {self.no_target_threshold:g}"
                if self.no_target_rule == "head" else
                f"no-target when the predicted foreground covers < {self.no_target_min_area:g} of the image")
        return f"pixel foreground when p > {self.mask_threshold:g}; {rule}"

    def masks(self, prob: torch.Tensor, no_target_prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prob (B, H, W) and no-target probabilities (B,) -> binary masks (B, H, W) and verdicts (B,)."""
        mask = prob > self.mask_threshold
        if self.no_target_rule == "head":
            return mask, no_target_prob > self.no_target_threshold
        area = mask.flatten(1).float().mean(1)  # (B,)
        return mask, area < self.no_target_min_area
