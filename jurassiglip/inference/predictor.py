"""Inference: a trained checkpoint + an image + captions -> masks and no-target verdicts.

The model outputs mask logits and a no-target logit per caption. The
no-target decision is an explicit rule with a threshold (SPEC §5): `head`
calls a caption no-target when the learned head's probability exceeds
`no_target_threshold`; `area` when the predicted foreground covers less than
`no_target_min_area` of the image. Evaluation, the gallery and the
`jurassiglip predict` CLI all go through `Predictor.infer` (encode images ->
encode captions -> decode -> upsample logits to the size asked for ->
decide), so they apply the same threshold and rule, and all refuse a
checkpoint whose heads were not trained for what is asked of them
(`check_trained_for`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from jurassiglip.model import checkpoint
from jurassiglip.config import EvaluateConfig
from jurassiglip.data.images import read_image, to_rgb
from jurassiglip.data.tokenizer import tokenize
from jurassiglip.model.build import model_from_payload
from jurassiglip.model.model import JurasSigLIP
from jurassiglip.model.spec import ModelSpec


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


@dataclass(frozen=True)
class Inference:
    """The model's answer for one caption at the size asked for (tensors on the predictor's device)."""

    prob: torch.Tensor     # (H, W) float32 foreground probability (sigmoid of the upsampled logits)
    mask: torch.Tensor     # (H, W) bool: prob > decision.mask_threshold
    no_target_prob: float  # the no-target head's probability
    no_target: bool        # the decision rule's verdict


@dataclass
class Prediction:
    text: str
    mask: np.ndarray   # (H, W) bool at the input image's size
    prob: np.ndarray   # (H, W) float32 foreground probability
    no_target: bool
    no_target_prob: float  # the no-target head's probability
    area: float        # predicted foreground fraction
    score: float       # mean probability inside the predicted mask (0 when empty)
    warnings: list[str] = field(default_factory=list)  # what the user should know about this answer


class Predictor:
    """A trained model ready for inference, with its tokenizer and decision rule."""

    def __init__(self, model: JurasSigLIP, tokenizer, spec: ModelSpec, decision: Decision,
                 device: torch.device | str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.decision = decision
        self.image_size = spec.arch.image_size
        self.text_max_len = spec.arch.text_max_len

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
    def infer(self, images: np.ndarray, captions: Sequence[str], owner: Sequence[int],
              sizes: Sequence[tuple[int, int]]) -> list[Inference]:
        """Masks, probabilities and no-target verdicts for captions about a batch of images.

        The one inference path: the CLI, evaluation and the gallery all call it.
        Mask logits are upsampled (bilinear, not binarised masks) to each
        caption's size, in one batch per distinct size, then thresholded.

        Args:
            images: uint8 (n_img, S, S, 3) images at the training size (see `prepare`).
            captions: C non-empty captions.
            owner: C indices into `images`: the image each caption is about.
            sizes: C (H, W) at which each caption's mask and probabilities are wanted.

        Returns:
            C results, in caption order.
        """
        if not len(captions) == len(owner) == len(sizes):
            raise ValueError(f"{len(captions)} captions, {len(owner)} owners and {len(sizes)} sizes: give one each")
        patches = self._encode_images(images)            # (n_img, N, D)
        tokens, mask = self._encode_texts(captions)      # (C, L, D), (C, L)
        index = torch.as_tensor(list(owner), dtype=torch.long, device=patches.device)
        logits, nt_prob = self._outputs(patches[index], tokens, mask)  # (C, 1, S, S), (C,)
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for k, size in enumerate(sizes):
            by_size[(int(size[0]), int(size[1]))].append(k)
        results: list[Inference | None] = [None] * len(captions)
        for size, members in by_size.items():
            rows = torch.as_tensor(members, dtype=torch.long, device=logits.device)
            prob = upsample_probabilities(logits[rows], size)                 # (G, H, W)
            masks, verdicts = self.decision.masks(prob, nt_prob[rows])        # (G, H, W), (G,)
            for j, k in enumerate(members):
                results[k] = Inference(prob=prob[j], mask=masks[j], no_target_prob=float(nt_prob[k]),
                                       no_target=bool(verdicts[j]))
        return results

    def _encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, S, S, 3) training-size images -> patch tokens (B, N, D)."""
        batch = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).to(self.device)
        patches, _ = self.model.encode_image(batch)
        return patches

    def _encode_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> projected tokens (B, L, D) and mask (B, L)."""
        for text in texts:
            if not text or not text.strip():
                raise ValueError("empty caption: give a non-empty --text")
        ids, mask = tokenize(self.tokenizer, list(texts), self.text_max_len)
        tokens, mask, _ = self.model.encode_text(ids.to(self.device), mask.to(self.device))
        return tokens, mask

    def _outputs(self, patches: torch.Tensor, tokens: torch.Tensor,
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
        pixels, size = self.prepare(image)
        results = self.infer(pixels[None], texts, [0] * len(texts), [size] * len(texts))
        out = []
        for text, result in zip(texts, results):
            m, p = result.mask.cpu().numpy(), result.prob.cpu().numpy()
            out.append(Prediction(text=text, mask=m, prob=p.astype(np.float32), no_target=result.no_target,
                                  no_target_prob=result.no_target_prob,
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


def upsample_probabilities(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits (B, 1, S, S) -> probabilities (B, H, W), interpolating logits (not binary masks)."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return torch.sigmoid(logits.float())[:, 0]
