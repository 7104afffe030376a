"""Checkpoints a team can keep: safetensors files that carry their own config, written atomically.

A checkpoint (format 2) is one safetensors file, `best.safetensors` or
`latest.safetensors` in a training stage's `checkpoints/` folder.

Its tensors:
- `model.<state_dict key>`: the weights that were trained. With the real
  preset that is only the LoRA adapters, the text projection, the fusion,
  both heads and the logit scale and bias (3.36 M parameters, 13.4 MB in
  fp32, at real size): the frozen base towers are the published
  checkpoints, named with their revisions below, and would add 1.2 GB of
  copies. The
  tiny preset's towers are random and exist nowhere else, so its whole
  state_dict is stored (`ModelSpec.embeds_base` is the rule).
- `latest` only, what a resume needs bit for bit: `optimizer.state.<i>.<name>`
  (AdamW's moments and step of the i-th parameter) and `rng.torch` /
  `rng.cuda` (torch's generator states, ByteTensors).

Its metadata: one JSON document under the key `jurassiglip` holding the
format version, the model spec (model/spec.py `ModelSpec.to_dict`), the stage that
wrote it and which heads it trained, the base towers' names and hub revisions
(None for a local folder), the tokenizer (the tiny word tokenizer's files,
base64; for the real preset a reference to the base text checkpoint, whose
SigLIP2 tokenizer.json alone is 34 MB) and, for `latest`, the TrainState, the
start validation loss, the fingerprint of the run's inputs (a resume with
changed params starts over instead of continuing someone else's run) and the
optimizer's param_groups.

Identical runs write identical bytes (sorted JSON, no timestamps), so DVC
does not see a new checkpoint on every run. Format 1 (torch pickles named
best.pt / latest.pt, frozen towers included) is refused with a message that
says to retrain.

Why one long module: it is the one owner of the checkpoint format, writing and reading it.
"""

from __future__ import annotations

import base64
import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from jurassiglip.model.spec import ModelSpec
from jurassiglip.runtime import atomic

log = logging.getLogger(__name__)

FORMAT = 2
BEST = "best.safetensors"      # the weights of the best validation epoch: what inference and the next stage load
LATEST = "latest.safetensors"  # the last finished epoch, with what a resume needs
STAGES = ("contrastive_pretrain", "seg_finetune")
META_KEY = "jurassiglip"       # the one safetensors metadata entry; its value is the JSON document

_MODEL, _OPTIMIZER, _RNG = "model.", "optimizer.state.", "rng."
_FORMAT1_NAMES = ("best.pt", "latest.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, naming the file."""


# -- writing ----------------------------------------------------------------------------------------


def save(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Write `payload` as a format-2 checkpoint, atomically and byte-reproducibly.

    Args:
        payload: what the training stage hands over:
            spec: the ModelSpec; stage: one of STAGES;
            heads: {"segmentation": bool, "no_target": bool}, what the heads were trained for;
            model: the JurasSigLIP (its `trained_state_keys` and base configs are read);
            tokenizer: the caption tokenizer.
          and, to make it resumable (latest): optimizer (its state_dict), state (TrainState as a dict),
          start_val_loss, fingerprint, torch_rng, cuda_rng (None off CUDA).

    A process killed mid-write leaves its temporary sibling behind (never a
    half-written `path`); the next save of `path` removes it, so it does not
    end up in DVC's cache with the checkpoints folder.
    """
    path = Path(path)
    tensors, document = _encode(payload)
    metadata = {META_KEY: json.dumps(document, sort_keys=True, separators=(",", ":"), default=_json_number)}
    blob = save_tensors(tensors, metadata=metadata)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        log.info("removing %s, left by a writer that was killed", stale)
        stale.unlink(missing_ok=True)
    atomic.write_with(path, lambda tmp: tmp.write_bytes(blob))


def _encode(payload: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    spec: ModelSpec = payload["spec"]
    model, stage = payload["model"], payload["stage"]
    if stage not in STAGES:
        raise ValueError(f"checkpoint stage {stage!r}: expected one of {STAGES}")
    state = model.state_dict()
    keys = list(state) if spec.embeds_base else model.trained_state_keys()
    tensors = {_MODEL + key: _own(state[key]) for key in keys}  # own storage: safetensors refuses shared tensors
    document: dict[str, Any] = {
        "format": FORMAT,
        "stage": stage,
        "heads": {"segmentation": bool(payload["heads"]["segmentation"]),
                  "no_target": bool(payload["heads"]["no_target"])},
        "spec": spec.to_dict(),
        "base": base_sources(model, spec),
        "tokenizer": tokenizer_record(spec, payload["tokenizer"], model),
        "resume": None,
    }
    if "optimizer" in payload:
        optimizer = payload["optimizer"]
        values: dict[str, dict[str, Any]] = {}
        for index, entries in optimizer["state"].items():
            for name, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{_OPTIMIZER}{index}.{name}"] = _own(value)
                else:
                    values.setdefault(str(index), {})[name] = value
        tensors[_RNG + "torch"] = _own(payload["torch_rng"])
        if payload.get("cuda_rng") is not None:
            tensors[_RNG + "cuda"] = _own(payload["cuda_rng"])
        document["resume"] = {
            "state": payload["state"],
            "start_val_loss": payload["start_val_loss"],
            "fingerprint": payload["fingerprint"],
            "optimizer": {"param_groups": optimizer["param_groups"], "state_values": values},
        }
    return tensors, document


def _own(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def _json_number(value: Any) -> Any:
    """numpy and 0-dim torch numbers in a loss history or an optimizer's settings."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r} cannot go into a checkpoint's metadata")


def base_sources(model: Any, spec: ModelSpec) -> dict[str, Any]:
    """Where the base towers come from: {"embedded": True} for the tiny preset, else
    {"embedded": False, "vision": {"name", "revision"}, "text": {...}}.

    The revision is the hub commit the towers were loaded from (`model.base_revisions`,
    set by model/build.py `build_model`); None for a local folder, which has no commit.
    """
    if spec.embeds_base:
        return {"embedded": True}
    revisions = getattr(model, "base_revisions", {})
    names = {"vision": spec.arch.vision_name, "text": spec.arch.text_name}
    return {"embedded": False, **{tower: {"name": names[tower], "revision": revisions.get(tower)}
                                  for tower in ("vision", "text")}}


def tokenizer_record(spec: ModelSpec, tokenizer: Any, model: Any) -> dict[str, Any]:
    """The tokenizer as the metadata holds it: the tiny one's files, the real one by reference."""
    if spec.embeds_base:
        return {"files": {name: base64.b64encode(blob).decode("ascii")
                          for name, blob in tokenizer_files(tokenizer).items()}}
    return dict(base_sources(model, spec)["text"])


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The tokenizer as {file name: bytes}, to embed in a checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def restore_tokenizer(files: Mapping[str, bytes]) -> Any:
    """Rebuild a transformers tokenizer from embedded files."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, blob in files.items():
            (Path(tmp) / name).write_bytes(blob)
        return AutoTokenizer.from_pretrained(tmp)


def embedded_tokenizer(record: Mapping[str, Any]) -> Any | None:
    """The tokenizer embedded in a checkpoint's metadata, or None when it is a reference."""
    if "files" not in record:
        return None
    return restore_tokenizer({name: base64.b64decode(text) for name, text in record["files"].items()})


# -- reading ----------------------------------------------------------------------------------------


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; a missing, truncated, old or foreign file raises CheckpointError naming it.

    Returns:
        {"format", "stage", "heads", "base", "tokenizer" (metadata as written), "spec" (a ModelSpec),
         "model": {state_dict key: tensor} (the stored weights only, sorted by key)}, and for a resumable
        checkpoint also "optimizer" (a state_dict for `Optimizer.load_state_dict`), "state",
        "start_val_loss", "fingerprint", "torch_rng" and "cuda_rng" (None when not stored).
    """
    path = Path(path)
    if not path.is_file():
        old = [path.with_name(name) for name in _FORMAT1_NAMES if path.with_name(name).is_file()]
        hint = f" ({old[0].name} beside it is a format-1 checkpoint: retrain with `dvc repro`)" if old else ""
        raise CheckpointError(f"{path}: checkpoint not found{hint}")
    blob = path.read_bytes()
    try:
        tensors = load_tensors(blob)
        document = json.loads(_metadata(blob).get(META_KEY, "null"))
    except (SafetensorError, ValueError, OverflowError, UnicodeDecodeError) as err:
        if _torch_pickle(blob):
            raise CheckpointError(f"{path}: a torch pickle, not a safetensors checkpoint; if it is a format-1 "
                                  f"jurassiglip checkpoint (best.pt/latest.pt), retrain with `dvc repro` to get "
                                  f"{BEST} (format {FORMAT})") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or "spec" not in document:
        raise CheckpointError(f"{path}: not a jurassiglip checkpoint (format {FORMAT} with a model spec in its "
                              f"'{META_KEY}' metadata)")
    device = torch.device(map_location)
    payload: dict[str, Any] = {key: document[key] for key in ("format", "stage", "heads", "base", "tokenizer")}
    try:
        payload["spec"] = ModelSpec.from_dict(document["spec"])
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    # sorted: safetensors hands the tensors back in no fixed order
    payload["model"] = {key[len(_MODEL):]: tensors[key].to(device) for key in sorted(tensors) if key.startswith(_MODEL)}
    resume = document.get("resume")
    if resume is not None:
        state: dict[int, dict[str, Any]] = {}
        for key, tensor in sorted(tensors.items()):
            if key.startswith(_OPTIMIZER):
                index, name = key[len(_OPTIMIZER):].split(".", 1)
                state.setdefault(int(index), {})[name] = tensor
        for index, values in resume["optimizer"]["state_values"].items():
            state.setdefault(int(index), {}).update(values)
        payload.update(
            optimizer={"state": dict(sorted(state.items())), "param_groups": resume["optimizer"]["param_groups"]},
            state=resume["state"], start_val_loss=resume["start_val_loss"], fingerprint=resume["fingerprint"],
            torch_rng=tensors[_RNG + "torch"], cuda_rng=tensors.get(_RNG + "cuda"))
    return payload


def load_weights(path: str | Path, model: Any, payload: Mapping[str, Any]) -> None:
    """Put a checkpoint's weights into `model` (built from its spec), naming `path` in any error.

    Every key the file stores must be in the model and every key the format
    stores (all of them when the base is embedded, else the trained ones)
    must be in the file, with fitting shapes.
    """
    weights = payload["model"]
    whole = payload["spec"].embeds_base
    expected = list(model.state_dict()) if whole else model.trained_state_keys()
    missing = [key for key in expected if key not in weights]
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model its spec describes: "
                              f"missing {missing[:5]} ({len(missing)} in all), "
                              f"unexpected {unexpected[:5]} ({len(unexpected)} in all)")
    try:
        model.load_state_dict(weights, strict=whole)
    except RuntimeError as err:  # shapes that do not fit
        reason = " ".join(str(err).split())  # torch's report spans lines; the error stays one line
        raise CheckpointError(f"{path}: weights do not fit the model its spec describes: {reason}") from None


def _torch_pickle(blob: bytes) -> bool:
    """A torch.save file (a zip, or a legacy pickle: protocol opcode 0x80), told apart from a safetensors
    file whose 8-byte header length happens to start with the same byte by the `{` of its JSON header."""
    return (blob[:4] == b"PK\x03\x04" or blob[:1] == b"\x80") and blob[8:9] != b"{"


def _metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (8-byte little-endian header length, then JSON)."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    return header.get("__metadata__") or {}


@dataclass
class TrainState:
    """What `latest.safetensors` restores besides the weights."""

    epoch: int                  # epochs completed
    best_val: float
    best_epoch: int
    bad_epochs: int             # epochs since the last improvement (early stopping)
    history: list[dict[str, float]]


def load_latest(path: Path, fingerprint: str, best_path: Path | None = None) -> dict[str, Any] | None:
    """The resumable state in `path` if it exists, is readable and matches `fingerprint`.

    A missing file returns None quietly (the caller says when nothing at all is
    resumable: training/resume.py). A corrupt file or one from other params is
    reported in the log and passed over, never half-used. The best checkpoint it refers to
    (`best_path`, default BEST beside it) must be readable too: a resumed run
    that never improves again would otherwise finish with a broken best.
    """
    if not path.exists():
        return None
    try:
        payload = load(path)
    except CheckpointError as err:
        log.warning("%s; not resumed", err)
        return None
    if payload.get("fingerprint") != fingerprint:
        log.info("%s belongs to another run (other params, code or inputs): not resumed", path)
        return None
    if payload["state"]["best_epoch"] > 0:
        try:
            load(best_path or path.with_name(BEST))
        except CheckpointError as err:
            log.warning("%s; the best weights of %s are lost: not resumed", err, path)
            return None
    return payload
