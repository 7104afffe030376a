"""Inference: a trained checkpoint + an image + captions -> masks and no-target verdicts.

The model outputs mask logits and a no-target logit per caption. The
no-target decision is an explicit rule with a threshold (SPEC §5): `head`
calls a caption no-target when the learned head's probability exceeds
`no_target_threshold`; `area` when the predicted foreground covers less than
`no_target_min_area` of the image. Evaluation, the gallery and the
`jurassiglip predict` CLI all go through `Predictor`, so they apply the same
threshold and rule, and all refuse a checkpoint whose heads were not trained
for what is asked of them (`check_trained_for`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from jurassiglip import checkpoint
from jurassiglip.config import EvaluateConfig
from jurassiglip.data.manifest import to_rgb
from jurassiglip.data.tokenizer import tokenize
from jurassiglip.model.build import model_from_payload
from jurassiglip.model.model import JurasSigLIP


@dataclass(frozen=True)
class Decision:
    """Mask threshold and no-target rule (the numbers reported next to the metrics).

    The defaults are those of params.yaml's evaluate section (the CLI uses them).
    """

    mask_threshold: float = 0.4        # sigmoid probability above which a pixel is foreground
    no_target_rule: str = "head"       # head | area
    no_target_min_area: float = 0.01   # area rule: foreground fraction below which a caption is no-target
    no_target_threshold: float = 0.5   # head rule: no-target probability above which a caption is no-target

    def __post_init__(self) -> None:
        if self.no_target_rule not in ("head", "area"):
            raise ValueError(f"no-target rule {self.no_target_rule!r}: use 'head' or 'area'")

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


@dataclass
class Prediction:
    text: str
    mask: np.ndarray   # (H, W) bool at the input image's size
    prob: np.ndarray   # (H, W) float32 foreground probability
    no_target: bool
    no_target_prob: float  # the no-target head's probability
    area: float        # predicted foreground fraction
    score: float       # mean probability inside the predicted mask (0 when empty)


class Predictor:
    """A trained model ready for inference, with its tokenizer and decision rule."""

    def __init__(self, model: JurasSigLIP, tokenizer, spec: dict, decision: Decision,
                 device: torch.device | str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.decision = decision
        self.image_size = int(spec["arch"]["image_size"])
        self.text_max_len = int(spec["arch"]["text_max_len"])

    @classmethod
    def from_checkpoint(cls, path: str | Path, decision: Decision, device: torch.device | str | None = None,
                        ) -> Predictor:
        """Load a seg_finetune checkpoint (its own spec and tokenizer inside), LoRA merged for speed.

        Raises:
            checkpoint.CheckpointError: unreadable, or its heads untrained for `decision` (see
                `check_trained_for`), before any base tower is loaded.
        """
        payload = checkpoint.load(path)
        check_trained_for(path, payload, decision)
        model, tokenizer, spec = model_from_payload(path, payload, merge=True)
        return cls(model, tokenizer, spec, decision, device)

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, S, S, 3) training-size images -> patch tokens (B, N, D)."""
        batch = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).to(self.device)
        patches, _ = self.model.encode_image(batch)
        return patches

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> projected tokens (B, L, D) and mask (B, L)."""
        for text in texts:
            if not text or not text.strip():
                raise ValueError("empty caption: give a non-empty --text")
        ids, mask = tokenize(self.tokenizer, list(texts), self.text_max_len)
        tokens, mask, _ = self.model.encode_text(ids.to(self.device), mask.to(self.device))
        return tokens, mask

    @torch.no_grad()
    def outputs(self, patches: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D), (B, L, D), (B, L) -> mask logits (B, 1, S, S) at training size and no-target
        probabilities (B,)."""
        logits, no_target = self.model.decode(patches, tokens, mask)
        return logits, torch.sigmoid(no_target.float())

    def prepare(self, image: Image.Image | np.ndarray | str | Path) -> tuple[np.ndarray, tuple[int, int]]:
        """Any image (path, PIL of any mode, array) -> uint8 (S, S, 3) and its original (H, W)."""
        if isinstance(image, (str, Path)):
            image = read_image(image)
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        rgb = to_rgb(image)
        size = (rgb.height, rgb.width)
        resized = rgb.resize((self.image_size, self.image_size), Image.BILINEAR)
        return np.asarray(resized, dtype=np.uint8), size

    def predict(self, image: Image.Image | np.ndarray | str | Path, texts: Sequence[str]) -> list[Prediction]:
        """Masks at the image's own size for each caption."""
        if not texts:
            raise ValueError("no caption given: pass at least one text")
        pixels, (height, width) = self.prepare(image)
        patches = self.encode_images(pixels[None])  # (1, N, D)
        tokens, mask = self.encode_texts(texts)       # (T, L, D), (T, L)
        logits, nt_prob = self.outputs(patches.expand(len(texts), -1, -1), tokens, mask)  # (T, 1, S, S), (T,)
        prob = upsample_probabilities(logits, (height, width))  # (T, H, W)
        masks, no_target = self.decision.masks(prob, nt_prob)
        out = []
        for i, text in enumerate(texts):
            m, p = masks[i].cpu().numpy(), prob[i].cpu().numpy()
            out.append(Prediction(text=text, mask=m, prob=p.astype(np.float32), no_target=bool(no_target[i]),
                                  no_target_prob=float(nt_prob[i]),
                                  area=float(m.mean()), score=float(p[m].mean()) if m.any() else 0.0))
        return out


def check_trained_for(path: str | Path, payload: dict, decision: Decision) -> None:
    """Refuse a checkpoint whose heads were not trained for this inference, in one line naming it.

    A contrastive_pretrain checkpoint has a random segmentation head; a
    seg_finetune run with `finetune.no_target_weight` 0 leaves the no-target
    head random, so the `head` rule would decide at random.
    """
    heads = payload["heads"]
    if not heads["segmentation"]:
        raise checkpoint.CheckpointError(
            f"{path} was written by {payload['stage']}: its segmentation head is untrained; "
            f"use data/seg_finetune/checkpoints/{checkpoint.BEST}")
    if decision.no_target_rule == "head" and not heads["no_target"]:
        raise checkpoint.CheckpointError(
            f"{path} has an untrained no-target head (trained with finetune.no_target_weight 0): "
            f"use --no-target-rule area (evaluate.no_target_rule: area in params.yaml)")


def read_image(path: str | Path) -> Image.Image:
    """An image file as RGB (any PIL mode converted); a clear error naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    try:
        with Image.open(path) as opened:
            opened.load()
            return to_rgb(opened).copy()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: cannot read the image ({err})") from None


def upsample_probabilities(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits (B, 1, S, S) -> probabilities (B, H, W), interpolating logits (not binary masks)."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return torch.sigmoid(logits.float())[:, 0]
