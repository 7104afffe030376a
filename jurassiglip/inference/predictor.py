"""Inference: a trained checkpoint + an image + captions -> masks and no-target verdicts.

The model outputs mask logits and a no-target logit per caption; a
`Decision` (decision.py) turns them into masks and verdicts. Evaluation,
the gallery, the demo and the `jurassiglip predict` CLI all go through
`Predictor.infer` (encode images -> encode captions -> decode -> upsample
logits to the size asked for, optionally with sliding windows -> decide),
so they apply the same threshold and rule, and all refuse a
checkpoint whose heads were not trained for what is asked of them
(`check_trained_for`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from jurassiglip.model import checkpoint
from jurassiglip.data.images import read_image, to_rgb
from jurassiglip.data.tokenizer import read_caption, tokenize
from jurassiglip.model.build import model_from_payload
from jurassiglip.model.model import JurasSigLIP
from jurassiglip.model.spec import ModelSpec
from jurassiglip.inference.decision import Decision

log = logging.getLogger(__name__)


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
    unknown_words: list[str] = field(default_factory=list)  # words of `text` the tokenizer does not know


class Predictor:
    """A trained model ready for inference, with its tokenizer and decision rule."""

    def __init__(self, model: JurasSigLIP, tokenizer, spec: ModelSpec, decision: Decision,
                 device: torch.device | str | None = None):
        self.device = inference_device(device)
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
            ValueError: a device this machine does not have (see `inference_device`).
            checkpoint.CheckpointError: unreadable, or its heads untrained for `decision` (see
                `check_trained_for`), before any base tower is loaded.
        """
        device = inference_device(device)  # an unusable device is refused before anything is read
        payload = checkpoint.load(path)
        check_trained_for(path, payload, decision)
        model, tokenizer, spec = model_from_payload(path, payload, merge=True)
        return cls(model, tokenizer, spec, decision, device)

    @torch.no_grad()
    def infer(self, images: np.ndarray, captions: Sequence[str], owner: Sequence[int],
              sizes: Sequence[tuple[int, int]], *, full_images: Sequence[np.ndarray] | None = None,
              window_stride: float = 0.5) -> list[Inference]:
        """Masks, probabilities and no-target verdicts for captions about a batch of images.

        The one inference path: the CLI, evaluation and the gallery all call it.
        Mask logits are upsampled (bilinear, not binarised masks) to each
        caption's size, in one batch per distinct size, then thresholded.

        Args:
            images: uint8 (n_img, S, S, 3) images at the training size (see `prepare`).
            captions: C non-empty captions.
            owner: C indices into `images`: the image each caption is about.
            sizes: C (H, W) at which each caption's mask and probabilities are wanted.
            full_images: sliding-window inference (dinov3.seg): per image, the uint8 (H, W, 3) image at
                its own size. Windows of the training size S, every `window_stride` x S pixels (the
                last flush with the edge), are decoded and their logits averaged by count on the
                full canvas; the mean of that canvas and the global view's logits (upsampled) is
                the mask's. The no-target verdict is the global view's. An image smaller than S on
                a side has only the global view.
            window_stride: the windows' step, as a fraction of S (0.5: half-overlapping).

        Returns:
            C results, in caption order.
        """
        if not len(captions) == len(owner) == len(sizes):
            raise ValueError(f"{len(captions)} captions, {len(owner)} owners and {len(sizes)} sizes: give one each")
        pixels = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).to(self.device)  # (n_img, 3, S, S)
        patches, _ = self.model.encode_image(pixels)     # (n_img, N, D)
        tokens, mask = self._encode_texts(captions)      # (C, L, D), (C, L)
        index = torch.as_tensor(list(owner), dtype=torch.long, device=patches.device)
        logits, nt_prob = self._outputs(patches[index], tokens, mask, pixels[index])  # (C, 1, S, S), (C,)
        if full_images is not None:
            return [self._windowed(full_images[i], tokens[k:k + 1], mask[k:k + 1], logits[k:k + 1], nt_prob[k],
                                   sizes[k], window_stride) for k, i in enumerate(owner)]
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

    def _windowed(self, image: np.ndarray, tokens: torch.Tensor, mask: torch.Tensor, global_logits: torch.Tensor,
                  nt_prob: torch.Tensor, size: tuple[int, int], stride: float) -> Inference:
        """One caption's answer from the windows of its full-size image and its global view (see `infer`)."""
        height, width = image.shape[:2]
        side = self.image_size
        logits = F.interpolate(global_logits.float(), size=(height, width), mode="bilinear", align_corners=False)
        if min(height, width) >= side:
            step = max(1, round(stride * side))
            corners = [(y, x) for y in window_starts(height, side, step) for x in window_starts(width, side, step)]
            crops = np.stack([image[y:y + side, x:x + side] for y, x in corners])  # (n, S, S, 3)
            pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).to(self.device)
            patches, _ = self.model.encode_image(pixels)  # (n, N, D)
            n = len(corners)
            window_logits, _ = self._outputs(patches, tokens.expand(n, -1, -1), mask.expand(n, -1), pixels)
            total = torch.zeros((height, width), dtype=torch.float32, device=logits.device)
            count = torch.zeros_like(total)
            for (y, x), window in zip(corners, window_logits[:, 0].float()):
                total[y:y + side, x:x + side] += window
                count[y:y + side, x:x + side] += 1
            logits = (logits + (total / count)[None, None]) / 2  # every pixel has count >= 1
        prob = upsample_probabilities(logits, size)[0]  # (H', W')
        masks, _ = self.decision.masks(prob[None], nt_prob[None])
        global_prob = upsample_probabilities(global_logits, size)  # the no-target verdict is the global view's
        _, verdict = self.decision.masks(global_prob, nt_prob[None])
        return Inference(prob=prob, mask=masks[0], no_target_prob=float(nt_prob), no_target=bool(verdict[0]))

    def _encode_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> projected tokens (B, L, D) and mask (B, L)."""
        for text in texts:
            if not text or not text.strip():
                raise ValueError("empty caption: give a non-empty --text")
        ids, mask = tokenize(self.tokenizer, list(texts), self.text_max_len)
        tokens, mask, _ = self.model.encode_text(ids.to(self.device), mask.to(self.device))
        return tokens, mask

    def _outputs(self, patches: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                 images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D), (B, L, D), (B, L), images (B, 3, S, S) -> mask logits (B, 1, S, S) at training
        size and no-target probabilities (B,)."""
        logits, no_target = self.model.decode(patches, tokens, mask, images)
        return logits, torch.sigmoid(no_target.float())

    def prepare(self, image: Image.Image | np.ndarray | str | Path) -> tuple[np.ndarray, tuple[int, int]]:
        """Any image (path, PIL of any mode, array) -> uint8 (S, S, 3) and its original (H, W).

        A path is read upright, as a viewer shows it (`read_image` applies
        the EXIF orientation); a PIL image or an array is taken as given.
        """
        if isinstance(image, (str, Path)):
            image = read_image(image)
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        rgb = to_rgb(image)
        size = (rgb.height, rgb.width)
        resized = rgb.resize((self.image_size, self.image_size), Image.BILINEAR)
        return np.asarray(resized, dtype=np.uint8), size

    def predict(self, image: Image.Image | np.ndarray | str | Path, texts: Sequence[str], *,
                sliding_window: bool = False) -> list[Prediction]:
        """Masks at the image's own size for each caption.

        A caption with words the tokenizer does not know gets them in
        `unknown_words` and a line in `warnings` (logged too): with no known
        word at all, the answer does not depend on the caption.

        Args:
            sliding_window: also decode windows of the training size over the image at its own
                size and average them with the global view (`infer`'s full_images): for images
                much larger than the training size.
        """
        check_captions(texts)
        if isinstance(image, (str, Path)):
            image = read_image(image)  # once: the sliding windows read the same upright pixels
        pixels, size = self.prepare(image)
        full = None
        if sliding_window:
            full = [np.asarray(to_rgb(Image.fromarray(image) if isinstance(image, np.ndarray) else image),
                               dtype=np.uint8)]
        results = self.infer(pixels[None], texts, [0] * len(texts), [size] * len(texts), full_images=full)
        out = []
        for text, result in zip(texts, results):
            m, p = result.mask.cpu().numpy(), result.prob.cpu().numpy()
            unknown, warnings = caption_warnings(self.tokenizer, text, self.text_max_len)
            for warning in warnings:
                log.warning("caption %r: %s", text, warning)
            out.append(Prediction(text=text, mask=m, prob=p.astype(np.float32), no_target=result.no_target,
                                  no_target_prob=result.no_target_prob,
                                  area=float(m.mean()), score=float(p[m].mean()) if m.any() else 0.0,
                                  warnings=warnings, unknown_words=unknown))
        return out


def check_captions(texts: Sequence[str]) -> None:
    """Refuse no caption or an empty one (ValueError), before any image is read or model run."""
    if not texts:
        raise ValueError("no caption given: pass at least one text")
    for text in texts:
        if not text or not text.strip():
            raise ValueError("empty caption: give a non-empty --text")


def caption_warnings(tokenizer, text: str, max_len: int) -> tuple[list[str], list[str]]:
    """The unknown words of a caption and the warnings a user should read with its answer.

    Returns:
        (unknown words, warnings): "no known word" when the model reads
        nothing it knows (the answer is the same for any such caption),
        else the unknown words when there are some; and a note when the
        caption is longer than the `max_len` tokens the model reads.
    """
    reading = read_caption(tokenizer, text, max_len)
    words = ", ".join(repr(w) for w in reading.unknown_words)
    warnings = []
    if reading.known_tokens == 0:
        warnings.append("no known word: the tokenizer knows none of its words"
                        + (f" ({words})" if words else " (it gives only special tokens)")
                        + ", so the answer does not depend on the caption")
    elif reading.unknown_words:
        warnings.append(f"unknown words, read as {tokenizer.unk_token}: {words}")
    if reading.truncated:
        warnings.append(f"longer than the {max_len} tokens the model reads: the rest is ignored")
    return reading.unknown_words, warnings


def inference_device(device: torch.device | str | None = None) -> torch.device:
    """The device asked for (default: cuda when available, else cpu), refused in one line when unusable.

    Raises:
        ValueError: not a device name torch knows, or a GPU this machine does not have.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(device)!r} is not a torch device: use cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r}: {why} (torch {torch.__version__}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available on this machine; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r}: predict runs on cpu, cuda or mps")
    return dev


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


def window_starts(length: int, window: int, step: int) -> list[int]:
    """Starts of the windows of `window` pixels covering [0, length): every `step`, the last one
    flush with the end (so every pixel is covered and no window leaves the image)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, step))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def upsample_probabilities(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits (B, 1, S, S) -> probabilities (B, H, W), interpolating logits (not binary masks)."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return torch.sigmoid(logits.float())[:, 0]
