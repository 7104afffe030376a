"""Where an interrupted training run finds its state again, however DVC ran the stage.

`latest.safetensors` in a stage's `checkpoints/` output holds what a resume
needs, but DVC does not always leave that folder as a killed run left it.
A plain `dvc repro` (or `python -m stages.<name>`) does: the folder is
`persist: true` in dvc.yaml. `dvc exp run` does not: in the workspace it
first checks out the outputs dvc.lock records, which replaces or deletes
the folder, and a `--temp` or queued experiment runs in a fresh copy of the
repository under `.dvc/tmp/exps/` that is deleted when it stops.

So the loop keeps a second copy of each checkpoint where DVC never looks:
`.dvc/tmp/resume/<checkpoint folder>/<run fingerprint>/` at the real
repository's root (paths.py `resume_copy_dir`, found through the
experiments' copies). The fingerprint (codedeps.fingerprint: params, the
stage's code, upstream files) is the key, so the same command run again
finds its run's state whichever way DVC runs it, and a run of other params
or code never sees it. A finished run's copy is kept too: a `--temp` or
queued experiment that has to re-run a finished training stage (DVC keeps
no run cache of persisting outputs) then finishes it at once with the same
weights instead of training again. The KEEP newest copies per checkpoint
folder stay; older ones are removed when a new run starts its copy.
Outside a DVC repository (no `.dvc` folder) there is no second copy.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jurassiglip.model import checkpoint
from jurassiglip.runtime import atomic
from jurassiglip.runtime.paths import resume_copy_dir

log = logging.getLogger(__name__)

KEEP = 8  # resume copies kept per checkpoint folder (the newest; a real-preset run's pair is about 55 MB)


@dataclass(frozen=True)
class Found:
    """A resumable run: the folder holding its latest and best checkpoints, and latest's contents."""

    folder: Path
    payload: dict[str, Any]  # checkpoint.load of latest.safetensors

    @property
    def epoch(self) -> int:
        return int(self.payload["state"]["epoch"])


@dataclass
class ResumePlaces:
    """The two places a run's checkpoints are kept: the stage's output folder and its resume copy.

    Args:
        ckpt_dir: the stage's checkpoints output (data/<stage>/checkpoints).
        fingerprint: the run's fingerprint (codedeps.fingerprint).
    """

    ckpt_dir: Path
    fingerprint: str
    copy_dir: Path | None = field(init=False)  # None outside a DVC repository
    _copy_failed: bool = field(default=False, init=False)
    _pruned: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.ckpt_dir = Path(self.ckpt_dir)
        self.copy_dir = resume_copy_dir(self.ckpt_dir, self.fingerprint)

    def places(self) -> list[Path]:
        return [self.ckpt_dir] + ([self.copy_dir] if self.copy_dir is not None else [])

    def find(self) -> Found | None:
        """The furthest resumable state of this run in either place, or None, saying so in the log.

        A latest checkpoint that is unreadable, belongs to another run or has lost its best
        checkpoint is reported by `checkpoint.load_latest` and passed over. On a tie the output
        folder wins (nothing to copy back).
        """
        found = []
        for folder in self.places():
            payload = checkpoint.load_latest(folder / checkpoint.LATEST, self.fingerprint)
            if payload is not None:
                found.append(Found(folder, payload))
        if not found:
            where = " or ".join(str(folder) for folder in self.places())
            note = "" if self.copy_dir is not None else " (not in a DVC repository: no resume copy is kept)"
            log.info("nothing to resume: no %s of this run in %s%s; starting over at epoch 1",
                     checkpoint.LATEST, where, note)
            return None
        return max(found, key=lambda f: f.epoch)  # max keeps the first of equals: the output folder

    def restore(self, found: Found) -> None:
        """Give both places the resumed run's best and latest checkpoints.

        When `found` is the resume copy, the output folder holds another run's checkpoints or none,
        and it must end with this run's best even if no later epoch improves; when it is the output
        folder, the copy may be missing (a run started before copies were kept) or behind.
        """
        names = [name for name in (checkpoint.BEST, checkpoint.LATEST) if (found.folder / name).is_file()]
        if found.folder != self.ckpt_dir:
            log.info("restoring %s from the resume copy %s", " and ".join(names), found.folder)
            for name in names:
                copy_file(found.folder / name, self.ckpt_dir / name)
        elif self.copy_dir is not None:
            self.keep_copy(names)

    def keep_copy(self, names: list[str]) -> None:
        """Copy the checkpoints just written to the output folder (`names`) into the resume copy.

        Best effort: a copy that cannot be written is a warning, once per run, not the end of the
        training; only a later `dvc exp run` of this run loses its resume then.
        """
        if self.copy_dir is None or self._copy_failed:
            return
        try:
            for name in names:
                copy_file(self.ckpt_dir / name, self.copy_dir / name)
        except OSError as err:
            self._copy_failed = True
            log.warning("cannot keep a resume copy in %s (%s): an interrupted `dvc exp run` of this stage will "
                        "start over", self.copy_dir, err)
            return
        if not self._pruned:
            self._pruned = True
            prune(self.copy_dir.parent, keep=KEEP, current=self.copy_dir)


def copy_file(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` atomically, first removing the temporary files a killed copy left there."""
    for stale in dst.parent.glob(f".{dst.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    atomic.write_with(dst, lambda tmp: shutil.copyfile(src, tmp))


def prune(parent: Path, keep: int, current: Path) -> None:
    """Remove all but the `keep` most recently written resume copies in `parent` (never `current`)."""
    copies = [p for p in parent.iterdir() if p.is_dir() and p != current]
    copies.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in copies[max(keep - 1, 0):]:
        log.info("removing the resume copy %s (only the %d newest are kept)", old, keep)
        shutil.rmtree(old, ignore_errors=True)
