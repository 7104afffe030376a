"""The fit loop shared by both training stages.

Epochs, validation, early stopping on validation loss, best and latest
checkpoints written atomically (format: checkpoint.py), resume from the
latest one, bf16 autocast on CUDA (fp32 on CPU), one progress line every N
steps, and a loud stop on a non-finite loss. What a step computes is the caller's business: it passes a
`loss_fn(batch) -> loss` (validation, and by default training through
`backward_step`), and may pass its own `train_step(batch) -> loss` that fills
the gradients itself (stage 1's gradient cache runs several forward and
backward passes per step).

Under torchrun (see distributed.py) every rank runs this loop on its shard:
the losses it reports are averaged over ranks, so every rank takes the same
early-stopping decision, and only rank 0 writes checkpoints, curves and logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from jurassiglip import checkpoint, distributed
from jurassiglip.checkpoint import TrainState

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent

Batch = dict[str, torch.Tensor]
# Computes the loss of a batch, fills the trainable parameters' .grad and returns the loss, detached;
# on a non-finite loss it returns the loss without any backward (fit then stops with NonFiniteLoss).
TrainStep = Callable[[Batch], torch.Tensor]


class NonFiniteLoss(FloatingPointError):
    """A NaN/inf loss; the message names the epoch, step and the batch's sample ids."""


@dataclass(frozen=True)
class LoopSettings:
    epochs: int
    patience: int
    log_every: int
    max_val_batches: int  # 0 = all
    lr_schedule: str = "constant"  # constant | cosine (decay to 0 over all epochs' steps)


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device() -> torch.device:
    """This process's GPU (its LOCAL_RANK under torchrun), else the CPU."""
    return torch.device("cuda", distributed.local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def autocast(dev: torch.device):
    """bf16 autocast on CUDA (as the prototype); plain fp32 on CPU."""
    if dev.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def fingerprint(*parts: Any, files: Iterable[Path] = ()) -> str:
    """Hash of the inputs that define a training run: params, upstream files, and this package's code.

    The code is included so that a resume never continues a run started by
    other code (DVC re-runs a stage after a code change; the old latest
    checkpoint must not be picked up then).
    """
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for path in [*sorted(PACKAGE_DIR.rglob("*.py")), *files]:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:20]


def backward_step(loss_fn: Callable[[Batch], torch.Tensor], dev: torch.device) -> TrainStep:
    """The usual training step: the loss under autocast, then its backward."""

    def step(batch: Batch) -> torch.Tensor:
        with autocast(dev):
            loss = loss_fn(batch)
        if torch.isfinite(loss):
            loss.backward()
        return loss.detach()

    return step


def fit(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Batch], torch.Tensor],
    train_batches: Callable[[int], Iterable[dict[str, torch.Tensor]]],
    val_batches: Callable[[], Iterable[dict[str, torch.Tensor]]],
    settings: LoopSettings,
    ckpt_dir: Path,
    best_payload: Callable[[], dict[str, Any]],
    run_fingerprint: str,
    tracker: Any,
    epoch_extras: Callable[[], dict[str, float]] = dict,
    after_step: Callable[[], None] = lambda: None,
    train_mode: Callable[[], Any] | None = None,
    train_step: TrainStep | None = None,
    is_main: bool | None = None,
) -> FitResult:
    """Train until `settings.epochs` or early stopping; resume from ckpt_dir's latest checkpoint when it matches.

    Args:
        train_batches: epoch -> batches (the sampler is reseeded from the epoch).
        val_batches: -> validation batches (same every call).
        best_payload: -> the checkpoint's contents (spec, model, tokenizer, stage, heads; see
            `checkpoint.save`), stored as ckpt_dir/best.safetensors (inference needs nothing else) and,
            with the optimizer, RNG and TrainState added, as ckpt_dir/latest.safetensors.
        run_fingerprint: from `fingerprint(...)`; a latest checkpoint of another fingerprint is not resumed.
        epoch_extras: more per-epoch values for the curve (e.g. the logit scale).
        after_step: called after every optimizer step (e.g. clamping the logit scale).
        train_mode: puts the model in training mode (default `model.train()`); stage 2
            keeps its frozen towers in eval mode so live and cached features agree.
        train_step: batch -> loss with the gradients filled (default: `backward_step(loss_fn)`).
        is_main: writes checkpoints and curves (default: rank 0 under torchrun, else True).
    """
    dev = next(model.parameters()).device
    train_mode = train_mode or model.train
    train_step = train_step or backward_step(loss_fn, dev)
    is_main = distributed.is_main() if is_main is None else is_main
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    latest_path, best_path = ckpt_dir / checkpoint.LATEST, ckpt_dir / checkpoint.BEST
    state = TrainState(epoch=0, best_val=math.inf, best_epoch=0, bad_epochs=0, history=[])
    start_val, resumed_from = math.nan, 0
    resume = checkpoint.load_latest(latest_path, run_fingerprint)
    distributed.check_same(-1 if resume is None else resume["state"]["epoch"],
                           f"the epoch to resume from ({latest_path})")
    if resume is not None:
        checkpoint.load_weights(latest_path, model, resume)
        optimizer.load_state_dict(resume["optimizer"])
        state = TrainState(**resume["state"])
        start_val, resumed_from = resume["start_val_loss"], state.epoch
        torch.set_rng_state(resume["torch_rng"])
        if dev.type == "cuda" and resume.get("cuda_rng") is not None:  # DINOv3's RoPE augmentation draws on the GPU
            torch.cuda.set_rng_state(resume["cuda_rng"], dev)
        log.info("resuming from %s after epoch %d (best val %.4f at epoch %d)",
                 latest_path, state.epoch, state.best_val, state.best_epoch)
        if is_main:
            tracker.restore_epochs("loss", state.history)
    else:
        start_val = evaluate_loss(model, loss_fn, val_batches(), settings.max_val_batches)
        train_mode()
        log.info("start: val loss %.4f", start_val)

    stopped_early = state.bad_epochs >= settings.patience
    while state.epoch < settings.epochs and not stopped_early:
        epoch = state.epoch + 1
        train_mode()
        train_loss = _train_epoch(optimizer, train_step, train_batches(epoch), epoch, settings, after_step, base_lrs,
                                  is_main)
        val_loss = evaluate_loss(model, loss_fn, val_batches(), settings.max_val_batches)
        row = {"train_loss": train_loss, "val_loss": val_loss, **epoch_extras()}
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
            payload = best_payload()
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
    if stopped_early:
        log.info("early stop: no val improvement for %d epochs", settings.patience)
    return FitResult(start_val_loss=start_val, best_val_loss=state.best_val, best_epoch=state.best_epoch,
                     epochs_run=state.epoch, stopped_early=stopped_early, resumed_from_epoch=resumed_from)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, loss_fn: Callable[[Batch], torch.Tensor],
                  batches: Iterable[Batch], max_batches: int) -> float:
    """Mean loss over validation batches (weighted by batch size, over all ranks); leaves the model in eval mode."""
    model.eval()
    total, count = 0.0, 0
    dev = next(model.parameters()).device
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        n = len(batch["sample_id"])
        with autocast(dev):
            loss = float(loss_fn(batch))
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


def _train_epoch(optimizer, train_step: TrainStep, batches, epoch: int, settings: LoopSettings,
                 after_step: Callable[[], None], base_lrs: list[float], is_main: bool) -> float:
    total, count, seen, start = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=None if is_main else True)
    steps = len(bar)
    for step, batch in enumerate(bar, start=1):
        factor = lr_factor(settings.lr_schedule, ((epoch - 1) * steps + step - 1) / (settings.epochs * steps))
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        optimizer.zero_grad(set_to_none=True)
        loss = train_step(batch)
        if not torch.isfinite(loss):
            ids = batch["sample_id"].tolist()
            raise NonFiniteLoss(f"non-finite loss {float(loss)} at epoch {epoch} step {step}; "
                                f"batch sample ids {ids}")
        optimizer.step()
        after_step()
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
