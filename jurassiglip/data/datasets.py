"""Torch datasets and samplers over the manifest.

Every dataset is indexed by `sample_id` (a manifest row), so a batch always
knows which samples it holds (error messages and the per-sample table name
them). Images come from the memory-mapped store build_manifest wrote; no
JPEG is opened and no polygon decoded here.

Samplers are seeded per epoch (seed, epoch), so a run resumed at an epoch
boundary sees exactly the batches an uninterrupted run would have seen, and
under DDP each rank takes its own slice of the same permutation: every
world_size-th sample, so that batch k of all ranks together holds exactly
the samples of batch k of a single process with the global batch size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from jurassiglip.data.manifest import Manifest


class CaptionDataset(Dataset):
    """(image, caption tokens[, target mask and no-target flag]) per sample, straight from the manifest.

    Args:
        manifest: the loaded manifest.
        input_ids, attention_mask: (n_samples, L) tokens of every manifest row.
        with_target: also return the training-size target mask and the no-target flag.
    """

    def __init__(self, manifest: Manifest, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 with_target: bool):
        self.manifest = manifest
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.image_index = manifest.samples["image_index"].to_numpy()
        self.with_target = with_target
        self.no_target = manifest.samples["no_target"].to_numpy(bool)

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, sample_id: int) -> dict[str, torch.Tensor]:
        image_index = int(self.image_index[sample_id])
        image = torch.from_numpy(np.array(self.manifest.images[image_index])).permute(2, 0, 1)  # (3, S, S)
        item = {
            "sample_id": torch.tensor(sample_id),
            "image_index": torch.tensor(image_index),
            "image": image,
            "input_ids": self.input_ids[sample_id],
            "attention_mask": self.attention_mask[sample_id],
        }
        if self.with_target:
            item["target"] = target_tensor(self.manifest, sample_id)
            item["no_target"] = torch.tensor(bool(self.no_target[sample_id]))
        return item


def target_tensor(manifest: Manifest, sample_id: int) -> torch.Tensor:
    """The training-size target of one sample as float (1, S, S)."""
    mask = manifest.target_mask([sample_id])[0]  # (S, S) bool
    return torch.from_numpy(mask).float().unsqueeze(0)


class EpochSampler(Sampler[int]):
    """Sample ids of one split, reshuffled per epoch from (seed, epoch).

    With `one_per_image`, each epoch holds one randomly chosen caption per
    image: a contrastive batch then never holds two captions of one image,
    which would otherwise be treated as each other's negatives.

    Args:
        sample_ids: candidate manifest rows.
        image_index: image of every candidate (same length), for one_per_image.
        seed: base seed; the epoch is mixed in by `set_epoch`.
        shuffle: False gives a fixed order (validation).
        rank, world_size: DDP slice, items rank, rank + world_size, ... of the epoch's order;
            every rank gets the same number of items (the last len % world_size are left out).
    """

    def __init__(self, sample_ids: Sequence[int], image_index: Sequence[int] | None, *, seed: int,
                 shuffle: bool = True, one_per_image: bool = False, rank: int = 0, world_size: int = 1):
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.image_index = None if image_index is None else np.asarray(image_index, dtype=np.int64)
        if one_per_image and self.image_index is None:
            raise ValueError("one_per_image needs the image index of every sample")
        self.seed = seed
        self.shuffle = shuffle
        self.one_per_image = one_per_image
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_ids(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        ids = self.sample_ids
        if self.one_per_image:
            order = rng.permutation(len(ids))  # random caption wins per image
            _, first = np.unique(self.image_index[order], return_index=True)
            ids = np.sort(ids[order[first]])
        if self.shuffle:
            ids = ids[rng.permutation(len(ids))]
        if self.world_size == 1:
            return ids
        per_rank = len(ids) // self.world_size
        return ids[:per_rank * self.world_size][self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._epoch_ids().tolist())

    def __len__(self) -> int:
        n = len(np.unique(self.image_index)) if self.one_per_image else len(self.sample_ids)
        return n // self.world_size
