"""Checkpoints that carry their own config, written atomically.

A checkpoint file holds the model spec (see model/build.py), the model's
state_dict, the tokenizer's files (so the tiny word tokenizer travels with
the weights), and, for `latest.pt`, the training state needed to resume:
optimizer, epoch, early-stopping counters, the loss history and a
fingerprint of the inputs, so a resume with changed params starts over
instead of silently continuing someone else's run.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jurassiglip import atomic

log = logging.getLogger(__name__)

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, naming the file."""


def save(path: Path, payload: dict[str, Any]) -> None:
    """torch.save through a temporary file + fsync + rename.

    A process killed mid-write leaves its temporary sibling behind (never a
    half-written `path`); the next save of `path` removes it, so it does not
    end up in DVC's cache with the checkpoints folder.
    """
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        log.info("removing %s, left by a writer that was killed", stale)
        stale.unlink(missing_ok=True)
    atomic.write_with(path, lambda tmp: _save_to(tmp, {"format": FORMAT, **payload}))


def _save_to(path: Path, payload: dict[str, Any]) -> None:
    # Through a file object: torch.save names the records inside its zip after the
    # file it is given, and the temporary name is random; the same payload must
    # give the same bytes, or DVC sees a new checkpoint on every run.
    with open(path, "wb") as file:
        torch.save(payload, file)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; a missing, truncated or foreign file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated zip, pickle garbage, ...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "spec" not in payload:
        raise CheckpointError(f"{path}: not a jurassiglip checkpoint (format {FORMAT} with a model spec)")
    return payload


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The tokenizer as {file name: bytes}, to embed in a checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def restore_tokenizer(files: dict[str, bytes]) -> Any:
    """Rebuild a transformers tokenizer from embedded files."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, blob in files.items():
            (Path(tmp) / name).write_bytes(blob)
        return AutoTokenizer.from_pretrained(tmp)


@dataclass
class TrainState:
    """What `latest.pt` restores besides the weights."""

    epoch: int                  # epochs completed
    best_val: float
    best_epoch: int
    bad_epochs: int             # epochs since the last improvement (early stopping)
    history: list[dict[str, float]]


def load_latest(path: Path, fingerprint: str, best_path: Path | None = None) -> dict[str, Any] | None:
    """The resumable state in `path` if it exists, is readable and matches `fingerprint`.

    A corrupt file or one from other params is reported and ignored (the run
    starts over); it is never half-used. The best checkpoint it refers to
    (`best_path`, default best.pt beside it) must be readable too: a resumed
    run that never improves again would otherwise finish with a broken best.pt.
    """
    if not path.exists():
        return None
    try:
        payload = load(path)
    except CheckpointError as err:
        log.warning("%s; starting over", err)
        return None
    if payload.get("fingerprint") != fingerprint:
        log.info("%s belongs to other params or inputs; starting over", path)
        return None
    if payload["state"]["best_epoch"] > 0:
        try:
            load(best_path or path.with_name("best.pt"))
        except CheckpointError as err:
            log.warning("%s; the best weights of %s are lost, starting over", err, path)
            return None
    return payload
