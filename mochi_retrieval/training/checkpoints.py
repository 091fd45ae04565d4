"""Atomic checkpoint files, a folder of the last N of them, and RNG state capture.

A :class:`CheckpointDir` holds ``step-00001200.pt`` files (the last ``keep``
of them) and ``last.pt``, a hard link to the newest (a copy where the file
system has no hard links). Each file is written to a temporary name and renamed
into place, so a crash or a full disk mid-write leaves the earlier files intact.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..files import atomic_write

logger = logging.getLogger(__name__)

LATEST = "last.pt"
_STEP_FILE = re.compile(r"step-(\d+)\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read (truncated, not a checkpoint) or written (disk full)."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load(path: str | Path, map_location: str | torch.device = "cpu", required: Sequence[str] = ()) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic` (tensors and plain data only).

    Raises:
        CheckpointError: naming the file, when it is truncated, not a torch file, not a
            dict, or lacks one of the ``required`` keys.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError, UnpicklingError ... for bad files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "(no message)"
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a checkpoint): "
                              f"{type(err).__name__}: {reason}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint: it holds a {type(state).__name__}")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint: it lacks {', '.join(missing)}")
    return state


def step_of(path: Path) -> int | None:
    """The step of a ``step-N.pt`` file name, else None."""
    match = _STEP_FILE.fullmatch(path.name)
    return int(match.group(1)) if match else None


class CheckpointDir:
    """The checkpoints of one run: ``step-N.pt`` files (the newest ``keep``) and ``last.pt``.

    Args:
        folder: ``OUTPUT_DIR/checkpoints``.
        keep: how many step files to keep; older ones are deleted after a new one is complete.
    """

    def __init__(self, folder: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep}: keep at least one checkpoint")
        self.folder, self.keep = Path(folder), keep

    @property
    def latest(self) -> Path:
        return self.folder / LATEST

    def step_path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.pt"

    def shard_path(self, step: int, rank: int, world: int) -> Path:
        """The file of process ``rank``'s share of a sharded bank, beside ``step-N.pt``."""
        return self.folder / f"step-{step:08d}.bank-{rank}-of-{world}.pt"

    def _remove(self, path: Path) -> None:
        """Delete a step file and the bank shard files written with it."""
        path.unlink(missing_ok=True)
        for part in self.folder.glob(f"{path.stem}.bank-*-of-*.pt"):
            part.unlink(missing_ok=True)

    def step_files(self) -> list[Path]:
        """``step-N.pt`` files, newest (highest step) first."""
        if not self.folder.is_dir():
            return []
        files = [p for p in self.folder.iterdir() if step_of(p) is not None]
        return sorted(files, key=lambda p: step_of(p), reverse=True)

    def candidates(self) -> list[Path]:
        """Files to resume from, best first: step files newest first, then ``last.pt`` unless it is one of them.

        ``last.pt`` alone is what runs before step files existed wrote.
        """
        files = self.step_files()
        latest = self.latest
        if latest.is_file() and not any(_same_file(latest, p) for p in files):
            files.append(latest)
        return files

    def save(self, state: dict[str, Any], step: int, replace_others: bool = False) -> Path:
        """Write ``step-N.pt`` atomically, point ``last.pt`` at it, delete step files beyond ``keep``.

        ``replace_others``: delete every other step file (a fresh run's first checkpoint
        replaces an earlier run's).

        Raises:
            CheckpointError: when the write fails (disk full ...); earlier checkpoints are untouched.
        """
        path = self.step_path(step)
        previous = self._previous()
        try:
            save_atomic(state, path)
            self._point_latest(path)
        except OSError as err:
            raise CheckpointError(f"could not write checkpoint {path}: {err}; {previous}") from err
        old = [p for p in self.step_files() if p != path] if replace_others else self.step_files()[self.keep:]
        for stale in old:
            self._remove(stale)
            logger.debug("deleted old checkpoint %s", stale)
        return path

    def _previous(self) -> str:
        """What survives a failed write, for its error message."""
        files = self.candidates()
        return f"the previous checkpoint {files[0]} is intact" if files else "there is no earlier checkpoint"

    def _point_latest(self, path: Path) -> None:
        tmp = self.folder / f".{LATEST}.link.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError as err:  # no hard links on this file system: a copy costs disk, not correctness
            logger.debug("hard link %s -> %s failed (%s); copying", path, tmp, err)
            shutil.copyfile(path, tmp)
        os.replace(tmp, self.latest)

    def set_aside(self, path: Path) -> Path:
        """Rename an unreadable checkpoint to ``NAME.unreadable``: kept for inspection, never resumed from."""
        target = path.with_name(path.name + ".unreadable")
        os.replace(path, target)
        if path.name != LATEST and self.latest.is_file() and _same_file(self.latest, target):
            self.latest.unlink()  # last.pt linked the same bad bytes
        return target

    def remove_temporaries(self) -> None:
        """Delete temporary files left by a process killed mid-write."""
        if not self.folder.is_dir():
            return
        for tmp in self.folder.glob(".*.tmp"):
            logger.info("removing %s, left by an interrupted checkpoint write", tmp)
            tmp.unlink(missing_ok=True)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them vanished meanwhile: not the same file
        return False


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states, as tensors and lists."""
    state = {
        "python": _python_state_to_list(random.getstate()),
        "numpy": _numpy_state_to_list(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_python_state_from_list(state["python"]))
    np.random.set_state(_numpy_state_from_list(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# weights_only loading accepts lists, ints and tensors, not tuples of arrays.
def _python_state_to_list(s):
    return [s[0], list(s[1]), s[2]]


def _python_state_from_list(s):
    return (s[0], tuple(s[1]), s[2])


def _numpy_state_to_list(s):
    return [s[0], torch.from_numpy(s[1].astype(np.int64)), s[2], s[3], s[4]]


def _numpy_state_from_list(s):
    return (s[0], s[1].numpy().astype(np.uint32), s[2], s[3], s[4])
