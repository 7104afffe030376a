"""The fit loop shared by both training stages, and the `Objective` it trains.

A stage's recipe hands `fit` an objective (stage 1's in contrastive_pretrain.py,
stage 2's in seg_finetune.py): the model and its trainable parameters, the
batches, the loss of a batch, the training step, and what the checkpoint
holds. The loop knows nothing else of either stage. It owns the epochs,
validation, early stopping on validation loss, AdamW and its learning-rate
schedule, best and latest checkpoints written atomically (format:
checkpoint.py), resume from the latest one of the same run (in the output
folder or the resume copy that survives `dvc exp run`: resume.py), bf16
autocast on CUDA (fp32 on CPU; env.py), one progress line every N steps, and
a loud stop on a non-finite loss.

Under torchrun (see distributed.py) every rank runs this loop on its shard:
the losses it reports are averaged over ranks, so every rank takes the same
early-stopping decision, and only rank 0 writes checkpoints, curves and logs.

Why one long module: the loop and the Objective protocol it drives are read together.
"""

from __future__ import annotations

import logging
import math
import time
from abc import abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from jurassiglip.model import checkpoint

from jurassiglip.runtime import distributed
from jurassiglip.model.checkpoint import TrainState
from jurassiglip.config import ConfigError, FinetuneConfig, PretrainConfig
from jurassiglip.data.datasets import EpochSampler, batch_loader
from jurassiglip.runtime.env import autocast
from jurassiglip.runtime.tracking import StageTracker
from jurassiglip.training.resume import ResumePlaces

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class NonFiniteLoss(FloatingPointError):
    """A NaN/inf loss; the message names the epoch, step and the batch's sample ids."""


@dataclass(frozen=True)
class LoopSettings:
    """The loop's numbers; `loop_settings` reads them from a training stage's params section."""

    epochs: int
    patience: int  # epochs without a better validation loss before the loop stops
    log_every: int  # training steps between progress lines
    max_val_batches: int  # 0 = all
    lr: float  # AdamW's base learning rate
    weight_decay: float  # AdamW's
    lr_schedule: str = "constant"  # constant | cosine (decay to 0 over all epochs' steps)


def loop_settings(cfg: PretrainConfig | FinetuneConfig) -> LoopSettings:
    """The loop's numbers from the `pretrain` or `finetune` section."""
    return LoopSettings(epochs=cfg.epochs, patience=cfg.patience, log_every=cfg.log_every,
                        max_val_batches=cfg.max_val_batches, lr=cfg.lr, weight_decay=cfg.weight_decay,
                        lr_schedule=cfg.lr_schedule)


@dataclass(frozen=True)
class FitResult:
    start_val_loss: float
    best_val_loss: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    resumed_from_epoch: int

    def metrics(self) -> dict[str, float | int]:
        """What a training stage reports to DVC and MLflow."""
        return {"start_val_loss": self.start_val_loss, "best_val_loss": self.best_val_loss,
                "best_epoch": self.best_epoch, "epochs_run": self.epochs_run}


class Objective(Protocol):
    """What a training recipe hands to `fit`: the model, its batches, its loss and step, its checkpoint.

    Stage 1's is `contrastive_pretrain.ContrastiveObjective`, stage 2's
    `seg_finetune.SegmentationObjective`. They subclass this protocol to inherit
    the defaults of `train_batches`, `val_batches` (from `batches`), `step`,
    `train_mode`, `after_step` and `epoch_extras`;
    the abstract members have none.
    """

    model: torch.nn.Module  # the whole model: fit restores its weights on resume and validates it in eval mode
    batches: EpochBatches   # this rank's training and validation batches

    @abstractmethod
    def trainable(self) -> list[torch.nn.Parameter]:
        """The parameters AdamW updates, in a fixed order (the latest checkpoint keeps their state by position)."""

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        """This rank's training batches of `epoch` (from 1), in an order that depends on the epoch only."""
        return self.batches.train(epoch)

    def val_batches(self) -> Iterable[Batch]:
        """This rank's validation batches, the same at every call."""
        return self.batches.val()

    @abstractmethod
    def loss(self, batch: Batch) -> torch.Tensor:
        """The scalar loss of a batch; fit validates with it, under autocast and without grad."""

    def step(self, batch: Batch) -> torch.Tensor:
        """One training step: the loss of `batch`, detached, with the trainable parameters' .grad filled.

        On a non-finite loss: the loss without any backward (fit then stops
        with NonFiniteLoss). Default: `backward_step` of `loss`.
        """
        return backward_step(self.loss, batch, next(self.model.parameters()).device)

    def train_mode(self) -> None:
        """Put the model in training mode, before every epoch (default: all of it)."""
        self.model.train()

    def after_step(self) -> None:
        """Called after every optimizer step (default: nothing)."""

    def epoch_extras(self) -> dict[str, float]:
        """More values for the epoch's row of the loss curve (default: none)."""
        return {}

    @abstractmethod
    def checkpoint_payload(self) -> dict[str, Any]:
        """The checkpoint's contents: spec, model, tokenizer, stage, heads (see `checkpoint.save`)."""


def backward_step(loss: Callable[[Batch], torch.Tensor], batch: Batch, dev: torch.device) -> torch.Tensor:
    """The usual training step: the loss under autocast, then its backward (none if it is not finite)."""
    with autocast(dev):
        value = loss(batch)
    if torch.isfinite(value):
        value.backward()
    return value.detach()


@dataclass(frozen=True)
class EpochBatches:
    """An objective's data: the training split in a new order every epoch, the validation split in a fixed one."""

    dataset: Dataset
    train_sampler: EpochSampler
    val_sampler: EpochSampler
    batch_size: int  # per rank
    num_workers: int
    drop_last: bool = False  # of the training batches; validation keeps a last, smaller batch

    def train(self, epoch: int) -> DataLoader:
        self.train_sampler.set_epoch(epoch)
        return batch_loader(self.dataset, sampler=self.train_sampler, batch_size=self.batch_size,
                            num_workers=self.num_workers, drop_last=self.drop_last)

    def val(self) -> DataLoader:
        return batch_loader(self.dataset, sampler=self.val_sampler, batch_size=self.batch_size,
                            num_workers=self.num_workers)


def check_split_sizes(manifest_root: Path, present: Collection[str], sizes: Mapping[str, int], unit: str, *,
                      train_split: str, val_split: str, batch_key: str, batch_size: int, world_size: int) -> None:
    """Refuse, before any model is built, splits the manifest lacks or leaves empty, and a batch larger than
    the training split (stage 1 drops the last partial batch, so it would have no step at all).

    Args:
        present: the splits the manifest holds.
        sizes: for the training and the validation split, the items an epoch draws (the stage's sampler).
        unit: what an item is, for the message ("captions", "images with a targeted caption").
        batch_key, batch_size: the global batch and its params key.
        world_size: ranks; each draws sizes // world_size items in batches of batch_size // world_size.

    Raises:
        ConfigError: naming the params key, its value and the manifest.
    """
    for key, split in (("data.train_split", train_split), ("data.val_split", val_split)):
        if split not in present:
            raise ConfigError(f"{key} = {split!r} is not a split of the manifest {manifest_root} (it holds "
                              f"{sorted(present)}): rebuild it (dvc repro build_manifest)")
        if sizes[split] // world_size == 0:
            raise ConfigError(f"{key} = {split!r} has {sizes[split]} {unit} in the manifest {manifest_root}: "
                              f"too few to train on {world_size} rank(s)")
    if batch_size // world_size > sizes[train_split] // world_size:
        raise ConfigError(f"{batch_key} = {batch_size} is larger than the training split {train_split!r} "
                          f"({sizes[train_split]} {unit} in {manifest_root}): lower {batch_key}")


def fit(objective: Objective, settings: LoopSettings, ckpt_dir: Path, run_fingerprint: str,
        tracker: StageTracker) -> FitResult:
    """Train until `settings.epochs` or early stopping; resume the latest checkpoint of the same run.

    Args:
        objective: the model, its batches, loss and training step, and what its checkpoint holds.
        ckpt_dir: gets best.safetensors, `objective.checkpoint_payload()` of the best validation epoch
            (inference needs nothing else), and latest.safetensors, that of the last epoch with the
            optimizer, RNG and TrainState added (a resume needs nothing else). In a DVC repository
            both are also copied to the run's resume copy (resume.py), where `dvc exp run` cannot
            delete them; the run resumes from whichever of the two got further.
        run_fingerprint: from `codedeps.fingerprint(...)`; a latest checkpoint of another fingerprint is not resumed.
        tracker: gets the loss curve, one row per epoch (from rank 0 only).
    """
    model = objective.model
    dev = next(model.parameters()).device
    is_main = distributed.is_main()
    optimizer = torch.optim.AdamW(objective.trainable(), lr=settings.lr, weight_decay=settings.weight_decay)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    latest_path, best_path = ckpt_dir / checkpoint.LATEST, ckpt_dir / checkpoint.BEST
    state = TrainState(epoch=0, best_val=math.inf, best_epoch=0, bad_epochs=0, history=[])
    start_val, resumed_from = math.nan, 0
    places = ResumePlaces(ckpt_dir, run_fingerprint)
    found = places.find()
    resume = None if found is None else found.payload
    distributed.check_same(-1 if found is None else found.epoch, f"the epoch to resume from ({latest_path})")
    if found is not None:
        resume_path = found.folder / checkpoint.LATEST
        checkpoint.load_weights(resume_path, model, resume)
        optimizer.load_state_dict(resume["optimizer"])
        state = TrainState(**resume["state"])
        # the checkpoint's JSON has sorted keys: back to the column order an uninterrupted run writes
        state.history = [_curve_row(row) for row in state.history]
        start_val, resumed_from = resume["start_val_loss"], state.epoch
        torch.set_rng_state(resume["torch_rng"])
        if dev.type == "cuda" and resume.get("cuda_rng") is not None:  # DINOv3's RoPE augmentation draws on the GPU
            torch.cuda.set_rng_state(resume["cuda_rng"], dev)
        log.info("resuming from %s after epoch %d (best val %.4f at epoch %d)",
                 resume_path, state.epoch, state.best_val, state.best_epoch)
        if is_main:
            places.restore(found)
            tracker.restore_epochs("loss", state.history)
    else:
        start_val = evaluate_loss(objective, settings.max_val_batches)
        objective.train_mode()
        log.info("start: val loss %.4f", start_val)

    stopped_early = state.bad_epochs >= settings.patience
    while state.epoch < settings.epochs and not stopped_early:
        epoch = state.epoch + 1
        objective.train_mode()
        train_loss = _train_epoch(objective, optimizer, epoch, settings, base_lrs, is_main)
        val_loss = evaluate_loss(objective, settings.max_val_batches)
        row = {"train_loss": train_loss, "val_loss": val_loss, **objective.epoch_extras()}
        state.history.append({"epoch": epoch, **row})
        improved = val_loss < state.best_val
        state.epoch = epoch
        if improved:
            state.best_val, state.best_epoch, state.bad_epochs = val_loss, epoch, 0
        else:
            state.bad_epochs += 1
        stopped_early = state.bad_epochs >= settings.patience
        log.info("epoch %d/%d: train %.4f val %.4f%s", epoch, settings.epochs, train_loss, val_loss,
                 " (best)" if improved else f" (no improvement for {state.bad_epochs})")
        if is_main:
            tracker.log_epoch("loss", epoch, row)
            payload = objective.checkpoint_payload()
            if improved:
                checkpoint.save(best_path, payload)
            checkpoint.save(latest_path, {
                **payload,
                "optimizer": optimizer.state_dict(),
                "state": asdict(state),
                "start_val_loss": start_val,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                "fingerprint": run_fingerprint,
            })
            places.keep_copy([checkpoint.BEST, checkpoint.LATEST] if improved else [checkpoint.LATEST])
    if stopped_early:
        log.info("early stop: no val improvement for %d epochs", settings.patience)
    return FitResult(start_val_loss=start_val, best_val_loss=state.best_val, best_epoch=state.best_epoch,
                     epochs_run=state.epoch, stopped_early=stopped_early, resumed_from_epoch=resumed_from)


def _curve_row(row: dict[str, float]) -> dict[str, float]:
    """A loss-curve row in the loop's column order: epoch, train_loss, val_loss, then the objective's extras."""
    first = ("epoch", "train_loss", "val_loss")
    return {**{key: row[key] for key in first}, **{key: value for key, value in row.items() if key not in first}}


@torch.no_grad()
def evaluate_loss(objective: Objective, max_batches: int) -> float:
    """Mean validation loss (weighted by batch size, over all ranks); leaves the model in eval mode."""
    objective.model.eval()
    total, count = 0.0, 0
    dev = next(objective.model.parameters()).device
    for i, batch in enumerate(objective.val_batches()):
        if max_batches and i >= max_batches:
            break
        n = len(batch["sample_id"])
        with autocast(dev):
            loss = float(objective.loss(batch))
        if not math.isfinite(loss):  # else NaN < best is False: no best checkpoint, and the run would go on silently
            raise NonFiniteLoss(f"non-finite validation loss {loss} at validation step {i + 1}; "
                                f"batch sample ids {batch['sample_id'].tolist()}")
        total += loss * n
        count += n
    total, count = distributed.all_reduce_sum([total, count])
    if count == 0:
        raise ValueError("validation split gave no batches: check data.val_split and batch sizes")
    return total / count


def lr_factor(schedule: str, progress: float) -> float:
    """Multiplier of the base learning rate at `progress` in [0, 1) of all training steps.

    The schedule is a pure function of the position, so a resumed run needs no
    scheduler state to continue exactly where it stopped.
    """
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def _train_epoch(objective: Objective, optimizer: torch.optim.Optimizer, epoch: int, settings: LoopSettings,
                 base_lrs: list[float], is_main: bool) -> float:
    total, count, seen, start = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(objective.train_batches(epoch), desc=f"epoch {epoch}", leave=False, disable=None if is_main else True)
    steps = len(bar)
    for step, batch in enumerate(bar, start=1):
        factor = lr_factor(settings.lr_schedule, ((epoch - 1) * steps + step - 1) / (settings.epochs * steps))
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        optimizer.zero_grad(set_to_none=True)
        loss = objective.step(batch)
        if not torch.isfinite(loss):
            ids = batch["sample_id"].tolist()
            raise NonFiniteLoss(f"non-finite loss {float(loss)} at epoch {epoch} step {step}; "
                                f"batch sample ids {ids}")
        optimizer.step()
        objective.after_step()
        n = len(batch["sample_id"])
        total += float(loss) * n
        count += n
        seen += n * distributed.world_size()
        if step % settings.log_every == 0:
            rate = seen / (time.perf_counter() - start)
            lr = optimizer.param_groups[0]["lr"]
            log.info("epoch %d step %d/%d: loss %.4f lr %.2e %.1f samples/s", epoch, step, steps,
                     total / count, lr, rate)
            bar.set_postfix(loss=f"{total / count:.4f}")
    total, count = distributed.all_reduce_sum([total, count])
    if count == 0:
        raise ValueError(f"epoch {epoch} had no training batches: check data.train_split and the batch size")
    return total / count
