"""A cache of a bank's initial pass: the corpus embedded by a given network, so that a later run with the same
network weights, documents and encoding settings loads the (N, D) embeddings instead of encoding the corpus
again (sentence-transformers' ``mine_hard_negatives(cache_folder=...)`` does the same for its mining).

The key hashes every tensor of the network's state dict, the texts in order and the encoding settings, so a
changed weight, document, prefix, maximum length or batch size is a miss, never a wrong hit.
"""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..files import atomic_write

logger = logging.getLogger(__name__)


def cache_key(net: nn.Module, texts: Sequence[str], settings: dict[str, Any]) -> str:
    """Hex digest over the network's weights and buffers, ``texts`` and ``settings`` (a JSON-like dict)."""
    h = hashlib.sha256()
    for name, value in net.state_dict().items():
        h.update(name.encode())
        if isinstance(value, Tensor):
            t = value.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(repr(sorted(settings.items())).encode())
    h.update(str(len(texts)).encode())
    for text in texts:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:32]


def cache_path(folder: str | Path, key: str) -> Path:
    return Path(folder) / f"bank-initial-{key}.pt"


def load(folder: str | Path, key: str, rows: int) -> Tensor | None:
    """The cached (rows, D) embeddings, or None (no file, or a file of another shape: ignored with a warning)."""
    path = cache_path(folder, key)
    if not path.is_file():
        return None
    emb = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(emb, Tensor) or emb.dim() != 2 or emb.shape[0] != rows:
        logger.warning("bank cache %s holds %s, not (%d, D) embeddings: ignored", path,
                       tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__, rows)
        return None
    logger.info("bank initial pass loaded from %s", path)
    return emb


def save(folder: str | Path, key: str, embeddings: Tensor) -> Path:
    path = cache_path(folder, key)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(f) -> None:
        buffer = io.BytesIO()
        torch.save(embeddings.detach().cpu().contiguous(), buffer)
        f.write(buffer.getvalue())

    atomic_write(path, write)
    logger.info("bank initial pass saved to %s", path)
    return path
