"""Atomic checkpoint files and RNG state capture."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file in the same folder, then rename it over ``path``.

    A crash mid-write leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic` (tensors and plain data only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


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
