"""Torch datasets and samplers over the manifest.

Every dataset is indexed by `sample_id` (a manifest row), so a batch always
knows which samples it holds (error messages and the per-sample table name
them). Images come from the memory-mapped store build_manifest wrote; no
JPEG is opened and no polygon decoded here.

Datasets read a whole batch at once (`__getitems__`: one fancy index per
array instead of one read and one `torch.stack` per sample) and hand it to
the DataLoader already collated; build loaders with `batch_loader`, whose
`collate` passes such a batch through. Targets stay bool (B, 1, S, S) until
the loss: an eighth of the memory and copies of float32.

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
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from jurassiglip.data.manifest import Manifest


class BatchDataset(Dataset):
    """A dataset indexed by sample_id that reads whole batches; subclasses implement `fetch`."""

    def fetch(self, sample_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """The collated batch of `sample_ids` (int64 array, in that order)."""
        raise NotImplementedError

    def __getitems__(self, sample_ids: list[int]) -> dict[str, torch.Tensor]:
        return self.fetch(np.asarray(sample_ids, dtype=np.int64))

    def __getitem__(self, sample_id: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.fetch(np.array([sample_id], dtype=np.int64)).items()}


def collate(batch: dict[str, torch.Tensor] | list) -> dict[str, torch.Tensor]:
    """DataLoader collate_fn: a batch from `__getitems__` passes through, a list of items is stacked."""
    return batch if isinstance(batch, dict) else default_collate(batch)


def batch_loader(dataset: Dataset, *, sampler, batch_size: int, num_workers: int = 0,
                 drop_last: bool = False) -> DataLoader:
    """The DataLoader every stage uses: batches of `batch_size` sample ids from `sampler`."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, collate_fn=collate)


class CaptionDataset(BatchDataset):
    """(image, caption tokens[, target mask and no-target flag]) per sample, straight from the manifest.

    A batch holds sample_id (B,), image_index (B,), image uint8 (B, 3, S, S),
    input_ids and attention_mask (B, L), and with `with_target` also target
    bool (B, 1, S, S) and no_target bool (B,).

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

    def fetch(self, sample_ids: np.ndarray) -> dict[str, torch.Tensor]:
        image_index = self.image_index[sample_ids]
        ids = torch.from_numpy(sample_ids)
        batch = {
            "sample_id": ids,
            "image_index": torch.from_numpy(image_index.astype(np.int64)),
            # (B, 3, S, S), a view of the stored (B, S, S, 3): the model's first op copies it anyway
            "image": torch.from_numpy(self.manifest.images[image_index]).permute(0, 3, 1, 2),
            "input_ids": self.input_ids[ids],
            "attention_mask": self.attention_mask[ids],
        }
        if self.with_target:
            batch["target"] = target_masks(self.manifest, sample_ids)
            batch["no_target"] = torch.from_numpy(self.no_target[sample_ids])
        return batch


def target_masks(manifest: Manifest, sample_ids: np.ndarray) -> torch.Tensor:
    """Training-size targets of `sample_ids` as bool (B, 1, S, S)."""
    return torch.from_numpy(manifest.target_mask(sample_ids)).unsqueeze(1)


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
