"""Loading a training sample the way the prototype notebook did (the baseline of R2 and R3).

Per sample: open the image file, convert to RGB and PIL-resize it to the
model size; decode every COCO annotation of the ref with pycocotools
`COCO.annToMask` (polygons where the annotation has them, RLE otherwise),
OR them together and PIL-resize the mask too. Only the one-off work is
left out: reading instances.json and the refs file happens once, in the
constructor. So is tokenisation (both sides get the same pre-tokenised ids)
and the DINOv3 image processor's normalisation (our model does it on the
tensor): leaving them out can only make the baseline faster.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from jurassiglip.data.manifest import Manifest

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
