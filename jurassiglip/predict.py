"""Inference: a trained checkpoint + an image + captions -> masks and no-target verdicts.

The model outputs mask logits only; the no-target decision is an explicit
rule on top of them (SPEC §5): a caption is called no-target when its
predicted foreground covers less than `no_target_min_area` of the image.
Evaluation, the gallery and the `jurassiglip predict` CLI all go through
`Predictor`, so they apply the same threshold and rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from jurassiglip.data.manifest import to_rgb
from jurassiglip.data.tokenizer import tokenize
from jurassiglip.model.build import model_from_checkpoint
from jurassiglip.model.model import JurasSigLIP


@dataclass(frozen=True)
class Decision:
    """Mask threshold and no-target rule (the numbers reported next to the metrics)."""

    mask_threshold: float      # sigmoid probability above which a pixel is foreground
    no_target_min_area: float  # foreground fraction below which the caption is called no-target

    def describe(self) -> str:
        return (f"pixel foreground when p > {self.mask_threshold:g}; no-target when the predicted "
                f"foreground covers < {self.no_target_min_area:g} of the image")

    def masks(self, prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prob (B, H, W) -> binary masks (B, H, W) and no-target verdicts (B,)."""
        mask = prob > self.mask_threshold
        area = mask.flatten(1).float().mean(1)  # (B,)
        return mask, area < self.no_target_min_area


@dataclass
class Prediction:
    text: str
    mask: np.ndarray   # (H, W) bool at the input image's size
    prob: np.ndarray   # (H, W) float32 foreground probability
    no_target: bool
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
        """Load a best.pt (its own spec and tokenizer inside), LoRA merged for speed."""
        model, tokenizer, spec = model_from_checkpoint(path, merge=True)
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
    def logits(self, patches: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N, D), (B, L, D), (B, L) -> mask logits (B, 1, S, S) at training size."""
        return self.model.segment(patches, tokens, mask)

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
        logits = self.logits(patches.expand(len(texts), -1, -1), tokens, mask)  # (T, 1, S, S)
        prob = upsample_probabilities(logits, (height, width))  # (T, H, W)
        masks, no_target = self.decision.masks(prob)
        out = []
        for i, text in enumerate(texts):
            m, p = masks[i].cpu().numpy(), prob[i].cpu().numpy()
            out.append(Prediction(text=text, mask=m, prob=p.astype(np.float32), no_target=bool(no_target[i]),
                                  area=float(m.mean()), score=float(p[m].mean()) if m.any() else 0.0))
        return out


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
