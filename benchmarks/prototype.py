"""The prototype notebook's way of loading a sample and of computing the stage-2 loss (baselines of R2, R3).

Per sample: open the image file, convert to RGB and PIL-resize it to the
model size; decode every COCO annotation of the ref with pycocotools
`COCO.annToMask` (polygons where the annotation has them, RLE otherwise),
OR them together and PIL-resize the mask too. Only the one-off work is
left out: reading instances.json and the refs file happens once, in the
constructor. So is tokenisation (both sides get the same pre-tokenised ids)
and the DINOv3 image processor's normalisation (our model does it on the
tensor): leaving them out can only make the baseline faster.

Stage-2 step (`prototype_loss_fn`): frozen towers live on every batch, then
the same fusion and heads as ours, with the mask logits upsampled by
F.interpolate and the loss as two autograd losses (Dice, then Focal), as
the notebook computed them; the no-target term is added as ours does, so
both sides train the same parameters.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from jurassiglip.config import FinetuneConfig
from jurassiglip.data.manifest import Manifest
from jurassiglip.training.losses import dice_loss, focal_loss, no_target_loss
from jurassiglip.model.model import JurasSigLIP

NO_TARGET = -1  # gRefCOCO's ann_id for "refers to nothing"


class PrototypeLoader:
    """Image + target of one ref, decoded from the source files every time.

    Args:
        grefs_path, instances_path, images_dir: the gRefCOCO-format source.
        size: side S the image and the mask are resized to.
    """

    def __init__(self, grefs_path: Path, instances_path: Path, images_dir: Path, size: int):
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its loading progress
            self.coco = COCO(str(instances_path))
        refs = json.loads(Path(grefs_path).read_text())
        self.ann_ids = {ref["ref_id"]: _as_list(ref["ann_id"]) for ref in refs}
        self.images_dir = Path(images_dir)
        self.size = size

    def no_target(self, ref_id: int) -> bool:
        return all(ann_id == NO_TARGET for ann_id in self.ann_ids[ref_id])

    def load(self, image_id: int, ref_id: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 image (S, S, 3) and bool target (S, S) of one ref."""
        info = self.coco.imgs[image_id]
        with Image.open(self.images_dir / info["file_name"]) as image:
            rgb = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        pixels = np.array(rgb, dtype=np.uint8)  # writable copy, as torch wants
        mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        for ann_id in self.ann_ids[ref_id]:
            if ann_id != NO_TARGET:
                mask |= self.coco.annToMask(self.coco.anns[ann_id])
        resized = Image.fromarray(mask * 255).resize((self.size, self.size), Image.Resampling.NEAREST)
        return pixels, np.asarray(resized) > 127


def _as_list(ann_id) -> list[int]:
    return list(ann_id) if isinstance(ann_id, list) else [ann_id]


class PrototypeCaptionDataset(Dataset):
    """The items of jurassiglip's CaptionDataset (with_target=True), decoded from the source files.

    Indexed by manifest sample_id, so both datasets serve the same samples.
    """

    def __init__(self, loader: PrototypeLoader, manifest: Manifest, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor):
        self.loader = loader
        self.image_id = manifest.samples["image_id"].to_numpy()
        self.ref_id = manifest.samples["ref_id"].to_numpy()
        self.input_ids = input_ids
        self.attention_mask = attention_mask

    def __len__(self) -> int:
        return len(self.image_id)

    def __getitem__(self, sample_id: int) -> dict[str, torch.Tensor]:
        ref_id = int(self.ref_id[sample_id])
        pixels, target = self.loader.load(int(self.image_id[sample_id]), ref_id)
        return {
            "sample_id": torch.tensor(sample_id),
            "image": torch.from_numpy(pixels).permute(2, 0, 1),  # (3, S, S) uint8
            "input_ids": self.input_ids[sample_id],
            "attention_mask": self.attention_mask[sample_id],
            "target": torch.from_numpy(target).float().unsqueeze(0),  # (1, S, S)
            "no_target": torch.tensor(self.loader.no_target(ref_id)),
        }


def prototype_loss_fn(model: JurasSigLIP, cfg: FinetuneConfig):
    """Stage-2 loss of a batch of images and captions, computed the prototype's way (see the module doc)."""

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            patches, _ = model.encode_image(batch["image"])  # (B, N, D)
            tokens, mask, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
        fused = model.fuse(patches, tokens, mask)  # (B, N, D)
        scores = model.head.mlp(fused).reshape(len(fused), 1, model.grid, model.grid)  # (B, 1, g, g)
        logits = F.interpolate(scores, size=(model.image_size, model.image_size), mode="bilinear",
                               align_corners=False)  # (B, 1, S, S)
        target = batch["target"].float()
        loss = cfg.dice_weight * dice_loss(logits, target) + \
            cfg.focal_weight * focal_loss(logits, target, cfg.focal_alpha, cfg.focal_gamma)
        if cfg.no_target_weight:
            loss = loss + cfg.no_target_weight * no_target_loss(model.no_target(fused), batch["no_target"])
        return loss

    return loss_fn
